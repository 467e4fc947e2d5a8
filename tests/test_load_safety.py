"""Safe checkpoint loading (weights_only, trusted class paths, clear errors for bad files) and recipe values checked
before any data is read or a run directory is made."""

from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder

from tlkit.cli import main
from tlkit.data.datamodule import ImageDataModule
from tlkit.export import load_checkpoint
from tlkit.features import extract_features
from tlkit.module import TransferClassifier, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = """
seed_everything: 0
trainer:
  max_epochs: 1
  limit_train_batches: 1
  limit_val_batches: 1
  default_root_dir: {root}
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: ""}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{filename: last, enable_version_counter: false}}
model:
  class_path: tlkit.TransferClassifier
  init_args: {{backbone: resnet18, lr: 0.05}}
data:
  class_path: tlkit.ImageDataModule
  init_args: {{source: digits, image_size: 32, batch_size: 16, augment: none}}
"""
COMMANDS = ("fit", "validate", "test", "predict")


class _Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """A recipe and the checkpoint `tlkit fit` wrote for it (with LightningCLI's ``_class_path``)."""
    root = tmp_path_factory.mktemp("safety")
    recipe = root / "tiny.yaml"
    recipe.write_text(TINY.format(root=root / "run"))
    main(["fit", "--config", str(recipe)])
    return recipe, root / "run" / "version_0" / "checkpoints" / "last.ckpt"


def _rewrite(ckpt: Path, out: Path, **changes) -> Path:
    checkpoint = torch.load(ckpt, weights_only=True)
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            checkpoint.setdefault(section, {})[name] = value
        else:
            checkpoint[section] = value
    torch.save(checkpoint, out)
    return out


def _load_paths(recipe: Path, tmp_path: Path) -> dict:
    """Every way tlkit reads a checkpoint, as a function of its path."""
    paths = {
        "load_from_checkpoint": lambda p: TransferClassifier.load_from_checkpoint(p),
        "export.load_checkpoint": load_checkpoint,
        "extract_features": lambda p: extract_features(
            str(p), ImageDataModule("digits"), out=str(tmp_path / "f.safetensors")
        ),
        "tlkit export": lambda p: main(["export", "--ckpt_path", str(p), "--out", str(tmp_path / "m.onnx")]),
        "tlkit extract": lambda p: main(["extract", "--ckpt_path", str(p), "--out", str(tmp_path / "x.st")]),
    }
    for command in COMMANDS:
        paths[f"tlkit {command}"] = lambda p, c=command: main([c, "--config", str(recipe), "--ckpt_path", str(p)])
    return paths


@pytest.mark.parametrize("env", ["", "1"], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_a_pickle_payload_is_refused_on_every_load_path(run, tmp_path, monkeypatch, env):
    recipe, ckpt = run
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", env)
    marker = tmp_path / "pwned"
    evil = _rewrite(ckpt, tmp_path / "evil.ckpt", payload=_Payload(marker))
    for name, load in _load_paths(recipe, tmp_path).items():
        with pytest.raises(ValueError, match=r"Refusing to load checkpoint .*evil\.ckpt.*pickled objects") as err:
            load(evil)
        assert "GLOBAL io.open" in str(err.value), name  # names what it refused
        assert not marker.exists(), f"{name} ran the payload"


def test_the_trainer_resolves_ckpt_path_last_with_weights_only(run, tmp_path, monkeypatch):
    """``--ckpt_path last`` names no file for tlkit (or LightningCLI) to check: the Trainer finds and loads it, and
    the CLI passes it ``weights_only=True`` (Lightning's default, None, would let the variable unpickle)."""
    recipe, ckpt = run
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    (tmp_path / "ckpts").mkdir()
    _rewrite(ckpt, tmp_path / "ckpts" / "last.ckpt", payload=_Payload(marker))
    args = ["--trainer.logger", "false", f"--trainer.callbacks.dirpath={tmp_path / 'ckpts'}", "--ckpt_path", "last"]
    with pytest.raises(Exception, match="Weights only load failed"):
        main(["fit", "--config", str(recipe), *args])
    assert not marker.exists()


def test_weights_only_false_is_refused(run):
    recipe, ckpt = run
    with pytest.raises(ValueError, match="weights_only"):
        main(["validate", "--config", str(recipe), "--ckpt_path", str(ckpt), "--weights_only", "false"])
    with pytest.raises(ValueError, match="weights_only=True"):
        TransferClassifier.load_from_checkpoint(ckpt, weights_only=False)


@pytest.mark.parametrize("section", ["hyper_parameters", "datamodule_hyper_parameters"])
def test_a_class_path_outside_tlkit_and_lightning_is_refused_without_importing_it(run, tmp_path, monkeypatch, section):
    recipe, ckpt = run
    marker = tmp_path / "imported"
    (tmp_path / "trace_module.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nfrom tlkit import TransferClassifier as Model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = _rewrite(ckpt, tmp_path / "bad.ckpt", **{f"{section}___class_path": "trace_module.Model"})
    for name, load in _load_paths(recipe, tmp_path).items():
        with pytest.raises(ValueError, match=rf"{section}\._class_path='trace_module\.Model', outside tlkit"):
            load(bad)
        assert not marker.exists(), f"{name} imported trace_module"
        assert "trace_module" not in sys.modules


def test_a_checkpoint_written_by_tlkit_fit_loads(run):
    """The refusals above are not refusing everything: tlkit's own checkpoint names only tlkit/Lightning classes."""
    _, ckpt = run
    assert read_checkpoint(ckpt)["hyper_parameters"]["_class_path"] == "tlkit.TransferClassifier"
    assert TransferClassifier.load_from_checkpoint(ckpt).class_names == [str(i) for i in range(10)]


def _bad_files(ckpt: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    data = ckpt.read_bytes()
    files = {"empty": b"", "half": data[: len(data) // 2], "text": b"not a checkpoint\n"}
    for name, content in files.items():
        (tmp_path / f"{name}.ckpt").write_bytes(content)
    return {
        "empty": (tmp_path / "empty.ckpt", "is an empty file"),
        "half": (tmp_path / "half.ckpt", "is truncated or not a torch checkpoint"),
        "text": (tmp_path / "text.ckpt", "is truncated or not a torch checkpoint"),
    }


def test_empty_truncated_and_foreign_files_get_one_clear_error_on_every_load_path(run, tmp_path):
    recipe, ckpt = run
    for kind, (path, what) in _bad_files(ckpt, tmp_path).items():
        for name, load in _load_paths(recipe, tmp_path).items():
            with pytest.raises(ValueError) as err:
                load(path)
            assert f"Checkpoint {path} {what}" in str(err.value), f"{name} on {kind}: {err.value}"


# ------------------------------------------------------------------------------------------------ recipe values

BAD_VALUES = [
    ("--model.init_args.lr", "-1", "lr=-1.0; the learning rate must be a number > 0"),
    ("--model.init_args.lr", "0", "lr=0.0; the learning rate must be a number > 0"),
    (
        "--model.init_args.optimizer",
        "adamx",
        "Unknown optimizer='adamx'; valid values: sgd, adam, adamw, rmsprop",
    ),
    ("--model.init_args.schedule", "cosin", "Unknown schedule='cosin'; valid values: constant, step, cosine, linear"),
    ("--model.init_args.warmup_epochs", "-1", "warmup_epochs=-1.0; it must be a number >= 0"),
    ("--model.init_args.weight_decay", "-0.1", "weight_decay=-0.1; it must be a number >= 0"),
    ("--data.init_args.image_size", "0", "image_size=0; use a whole number >= 1 or None"),
    ("--data.init_args.batch_size", "0", "batch_size=0; use a whole number >= 1"),
    ("--model.init_args.optimizer", "lbfgs", "TransferClassifier(optimizer='lbfgs') is gone: a head trained with"),
]


@pytest.mark.parametrize(
    ("key", "value", "message"), BAD_VALUES, ids=[f"{k.split('.')[-1]}={v}" for k, v, _ in BAD_VALUES]
)
def test_bad_recipe_values_fail_before_the_data_is_read_or_a_run_dir_made(tmp_path, key, value, message):
    """The data source does not exist: a check that ran after reading it would fail on the folder instead."""
    root = tmp_path / "run"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY.format(root=root))
    missing = ["--data.init_args.source", f"folder:{tmp_path / 'no_such_folder'}"]
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        main(["fit", "--config", str(recipe), *missing, key, value])
    assert not root.exists()


@pytest.mark.parametrize(("key", "value", "message"), [BAD_VALUES[0], BAD_VALUES[6]], ids=["lr", "image_size"])
def test_the_tlkit_command_exits_nonzero_on_quickstart_with_a_bad_value(tmp_path, key, value, message):
    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    override = ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    result = subprocess.run(
        ["tlkit", "fit", "--config", str(quickstart), *override, key, value],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no runs/quickstart


# ------------------------------------------------------------------------------------------------------ predict


def test_predict_labels_with_the_checkpoint_classes_when_the_data_has_others(run, tmp_path):
    recipe, ckpt = run
    other = write_image_folder(tmp_path / "letters", classes=[f"class_{c}" for c in "abcdefghij"], per_class=3)
    out = tmp_path / "preds.csv"
    args = ["--data.init_args.source", f"folder:{other}", "--data.init_args.val_split", "0.4"]
    writer = ["--trainer.callbacks+=tlkit.cli.PredictionCSVWriter", f"--trainer.callbacks.out={out}"]
    with pytest.warns(UserWarning, match=r"trained on classes \['0', '1'.*data module's classes are \['class_a'"):
        main(["predict", "--config", str(recipe), "--ckpt_path", str(ckpt), *args, *writer])
    predictions = {row["prediction"] for row in csv.DictReader(out.open())}
    assert predictions and predictions <= {str(i) for i in range(10)}


def test_predict_warns_when_the_predict_folder_classes_differ_from_the_model(run, tmp_path):
    recipe, ckpt = run
    folder = write_image_folder(tmp_path / "pets", classes=("cat", "dog"), per_class=2)
    out = tmp_path / "preds.csv"
    args = ["--data.init_args.predict_source", folder]
    writer = ["--trainer.callbacks+=tlkit.cli.PredictionCSVWriter", f"--trainer.callbacks.out={out}"]
    with pytest.warns(
        UserWarning, match=r"class folders \['cat', 'dog'\] that the model does not know; it was trained on \['0'"
    ):
        main(["predict", "--config", str(recipe), "--ckpt_path", str(ckpt), *args, *writer])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and {row["prediction"] for row in rows} <= {str(i) for i in range(10)}
    # A labelled sample of a few of its own classes is as expected: no warning.
    some = write_image_folder(tmp_path / "digits", classes=("3", "7"), per_class=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["predict", "--config", str(recipe), "--ckpt_path", str(ckpt), "--data.init_args.predict_source", some,
              *writer])  # fmt: skip
    assert not [w for w in caught if "does not know" in str(w.message)]


def test_a_checkpoint_with_another_class_count_is_named_in_the_error(run, tmp_path):
    recipe, ckpt = run
    three = write_image_folder(tmp_path / "three", per_class=4)
    with pytest.raises(ValueError, match=r"head has 10 classes .* built for 3"):
        main(
            ["predict", "--config", str(recipe), "--ckpt_path", str(ckpt), "--data.init_args.source", f"folder:{three}"]
        )


# ------------------------------------------------------------------------------------ checkpoints of earlier tlkit


def test_a_checkpoint_with_the_removed_feature_cache_loads_with_a_deprecation_warning(run, tmp_path):
    """Checkpoints written before tlkit.LinearProbe hold ``feature_cache: true``: Python and the CLI still load them."""
    recipe, ckpt = run
    old = _rewrite(ckpt, tmp_path / "old.ckpt", hyper_parameters__feature_cache=True)
    with pytest.warns(FutureWarning, match=r"feature_cache=True\) is deprecated and ignored.*tlkit\.LinearProbe"):
        model = TransferClassifier.load_from_checkpoint(old)
    assert "feature_cache" not in model.hparams  # a checkpoint saved from it no longer carries the key
    current = TransferClassifier.load_from_checkpoint(ckpt)
    for (name, a), b in zip(model.state_dict().items(), current.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    out = tmp_path / "preds.csv"
    writer = ["--trainer.callbacks+=tlkit.cli.PredictionCSVWriter", f"--trainer.callbacks.out={out}"]
    with pytest.warns(FutureWarning, match=r"feature_cache=True\) is deprecated"):
        main(["predict", "--config", str(recipe), "--ckpt_path", str(old), *writer])
    assert len(list(csv.DictReader(out.open()))) > 0
