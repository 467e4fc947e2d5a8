"""Tests for tlkit.data.shards: `tlkit optimize` and the litdata: source."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from subprocess import PIPE

import numpy as np
import pytest
import torch
from _ddp_shards import data, fingerprints
from conftest import tiny_trainer
from litdata import StreamingDataset
from PIL import Image

from tlkit import ImageDataModule, TransferClassifier
from tlkit.data import shards
from tlkit.data.sources import load_source

SCRIPT = Path(__file__).with_name("_ddp_shards.py")


def _folder(root: Path, per_class: int = 6) -> Path:
    """Two classes of small JPEGs whose colour says the class, one big JPEG and one PNG."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
            pixels[..., label] += 180
            Image.fromarray(pixels).save(root / name / f"{i}.jpg", quality=95)
    big = np.zeros((300, 200, 3), dtype=np.uint8)
    big[..., 0] = 230
    Image.fromarray(big).save(root / "cat" / "big.jpg")
    Image.fromarray(big).save(root / "cat" / "flat.png")
    return root


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = _folder(tmp_path_factory.mktemp("photos"))
    out = tmp_path_factory.mktemp("shards")
    with pytest.MonkeyPatch.context() as env:  # module-scoped: before conftest's per-test cache dir
        env.setenv("TLKIT_CACHE_DIR", str(tmp_path_factory.mktemp("tlkit_cache")))
        shards.optimize(source=f"folder:{root}", out=str(out), max_side=64, val_split=0.25)
    return root, out


def _items(split_dir: Path) -> list[dict]:
    dataset = StreamingDataset(str(split_dir))
    return [dataset[i] for i in range(len(dataset))]


def test_optimize_writes_every_image_with_its_label_resized_to_max_side(shards_dir: tuple[Path, Path]) -> None:
    root, out = shards_dir
    source = load_source(f"folder:{root}", val_split=0.25)
    train = source.train.take(shards.train_order(len(source.train), seed=0))  # classes mixed
    assert sorted(train.targets) == sorted(source.train.targets) and train.targets != source.train.targets
    meta = shards.read_meta(str(out))
    assert meta["class_names"] == ["cat", "dog"] and meta["labels"]["val"] == source.val.targets
    assert meta["labels"]["train"] == train.targets
    for name, split in (("train", train), ("val", source.val)):
        items = _items(out / name)
        assert [int(item["label"]) for item in items] == split.targets
        for item, path in zip(items, split.samples, strict=True):
            encoded = bytes(item["image"])
            with Image.open(io.BytesIO(encoded)) as img:
                assert img.format == "JPEG" and max(img.size) <= 64
            if path.endswith(".jpg") and "big" not in path:
                assert encoded == Path(path).read_bytes()  # small JPEGs: copied byte for byte


def test_litdata_source_loads_uint8_batches_with_the_source_labels(shards_dir: tuple[Path, Path]) -> None:
    root, out = shards_dir
    dm = ImageDataModule(source=f"litdata:{out}", image_size=32, batch_size=4, val_split=0.25, preprocess="dataset")
    folder = ImageDataModule(source=f"folder:{root}", image_size=32, batch_size=4, val_split=0.25)
    assert dm.class_names == folder.class_names and dm.class_counts == folder.class_counts
    labels = []
    for images, targets in dm.train_dataloader():
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
        labels.extend(targets.tolist())
    assert sorted(labels) == sorted(folder.data.train.targets)
    images, targets = next(iter(dm.val_dataloader()))
    colour = images.float().mean(dim=(2, 3)).argmax(dim=1)
    assert torch.equal(colour, targets)  # each image still shows its class's colour
    assert dm.preprocess.mean.shape == (3,) and dm.preprocess.mean[0] > dm.preprocess.mean[2]  # fitted on the shards


def test_fit_from_shards_saves_the_loader_position_and_resumes_it(
    shards_dir: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = shards_dir
    kwargs = dict(source=f"litdata:{out}", image_size=32, batch_size=2)
    model = TransferClassifier(backbone="test_efficientnet", pretrained=False, num_classes=2, lr=0.01)
    trainer = tiny_trainer(tmp_path, limit_train_batches=2, enable_checkpointing=True)
    trainer.fit(model, ImageDataModule(**kwargs))
    checkpoint = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), weights_only=True)
    state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["num_samples_yielded"] == 4 and state["dataset"]["seed"] == 0
    loader = ImageDataModule(**kwargs).train_dataloader()
    loader.load_state_dict(state)  # what Lightning does on resume: the rest of the epoch, not its start again
    uninterrupted = [t.tolist() for _, t in ImageDataModule(**kwargs).train_dataloader()]
    assert [t.tolist() for _, t in loader] == uninterrupted[2:]


def test_errors_name_the_fix(tmp_path: Path, shards_dir: tuple[Path, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="tlkit optimize --source"):
        _ = ImageDataModule(source=f"litdata:{tmp_path}").class_names
    with pytest.raises(ValueError, match="class weights"):
        ImageDataModule(source=f"litdata:{shards_dir[1]}", sampler="balanced")
    with pytest.raises(ValueError, match="predict_source"):
        ImageDataModule(source=f"litdata:{shards_dir[1]}").predict_split()


@pytest.mark.usefixtures("one_thread")
def test_ddp_ranks_stream_disjoint_parts_of_the_shards(shards_dir: tuple[Path, Path], tmp_path: Path) -> None:
    """2 processes over gloo: each rank reads its own part of the train split (the two "red" images are the same,
    ``big.jpg`` and ``flat.png``)."""
    _, out = shards_dir
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(SCRIPT), str(out), str(tmp_path)], check=True, timeout=600, env=env)
    seen = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    dm = data(str(out))
    everything = [v for images, _ in dm.train_dataloader() for v in fingerprints(dm.normalize(images))]
    # litdata drops what would leave the ranks unequal (its drop_last under DDP), at most a batch per rank
    assert len(seen[0]) == len(seen[1]) >= len(everything) // 2 - 2
    assert not Counter(seen[0] + seen[1]) - Counter(everything)  # disjoint parts (no image twice) of the shards


def test_optimize_runs_from_piped_code_and_leaves_the_processs_start_method(tmp_path: Path) -> None:
    # litdata set the process's start method to spawn: its processes re-imported the main module, which code piped
    # to `python -` does not have (it wrote 0 images, training stopped at "No chunks found"), every small optimize
    # spent ~15 s re-importing torch, and the caller's DataLoader workers were spawned from then on.
    root = _folder(tmp_path / "photos", per_class=3)
    code = (
        "import multiprocessing\nmultiprocessing.set_start_method('forkserver')\n"
        "from tlkit.data.shards import optimize\n"
        f"optimize(source='folder:{root}', out='{tmp_path / 'out'}')\n"
        "print('start method', multiprocessing.get_start_method())\n"
    )
    done = subprocess.run(
        [sys.executable, "-"], input=code, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TLKIT_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "start method forkserver" in done.stdout  # the caller's, as before
    meta = shards.read_meta(str(tmp_path / "out"))
    assert len(meta["labels"]["train"]) + len(meta["labels"]["val"]) == 8


def test_shards_train_loader_leaves_out_a_batch_of_one_image(shards_dir: tuple[Path, Path], tmp_path: Path) -> None:
    # An epoch's last batch of one image failed test_resnet's BatchNorm on 1x1 maps at 32 px ("Expected more than 1
    # value per channel when training") after the epoch had run.
    _, out = shards_dir
    train = len(shards.read_meta(str(out))["labels"]["train"])
    model = TransferClassifier("test_resnet", num_classes=2)
    dm = ImageDataModule(f"litdata:{out}", image_size=32, batch_size=train - 1, data_config=model.backbone.data_config)
    trainer = tiny_trainer(tmp_path / "run", limit_train_batches=None, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 1  # the full batch; the one image after it left out


def _damage_inside(path: Path) -> None:
    """Garbage over the middle of a JPEG's data: its header and end marker stay, so the scan passes it."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 200] = b"\xff\xc0" * 100
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("on_bad_image", ["skip", "raise"])
def test_files_damaged_inside_are_left_out_of_the_shards_and_listed(tmp_path: Path, on_bad_image: str) -> None:
    """A small JPEG is copied as is and a big one re-encoded: either, damaged inside, passed the scan, and was copied
    into the shards (training then crashed on it) or stopped optimize in litdata's worker processes."""
    root = _folder(tmp_path / "photos", per_class=4)
    small, big = root / "dog" / "2.jpg", root / "cat" / "big.jpg"
    for path in (small, big):
        _damage_inside(path)
    out = tmp_path / "shards"
    if on_bad_image == "raise":
        with pytest.raises(ValueError, match=r"(2\.jpg|big\.jpg): unreadable when encoded .*--on_bad_image skip"):
            shards.optimize(source=f"folder:{root}", out=str(out), max_side=64, on_bad_image="raise")
        return
    shards.optimize(source=f"folder:{root}", out=str(out), max_side=64, num_workers=2)
    meta = shards.read_meta(str(out))
    assert sorted(path for path, _ in meta["skipped"]) == sorted([str(big), str(small)])
    assert all("unreadable when encoded" in reason and ".cpp" not in reason for _, reason in meta["skipped"])
    source = load_source(f"folder:{root}", val_split=0.2)
    assert len(meta["labels"]["train"]) + len(meta["labels"]["val"]) == len(source.train) + len(source.val) - 2
    for name in shards.SPLITS:  # the items that were written, with their labels in order
        assert [int(item["label"]) for item in _items(out / name)] == meta["labels"][name]
    dm = ImageDataModule(source=f"litdata:{out}", image_size=32, batch_size=4)
    with pytest.warns(UserWarning, match="Skipped 2 unreadable image file"):
        dm.setup("fit")
    assert sum(len(targets) for _, targets in dm.train_dataloader()) == len(meta["labels"]["train"])


def test_a_run_that_stops_part_way_leaves_no_shards_folder_to_train_from(tmp_path: Path) -> None:
    """Re-running into a shards folder rewrote train/ and then failed: the old tlkit_shards.json (other classes, other
    labels) stayed beside the new chunks, and training read them with the old labels, silently."""
    out = tmp_path / "shards"
    shards.optimize(source=f"folder:{_folder(tmp_path / 'old')}", out=str(out), max_side=64)
    new = _folder(tmp_path / "new", per_class=4)
    _damage_inside(new / "dog" / "3.jpg")
    with pytest.raises(ValueError, match="unreadable when encoded"):
        shards.optimize(source=f"folder:{new}", out=str(out), max_side=64, on_bad_image="raise", val_split=0.5)
    with pytest.raises(FileNotFoundError, match="optimize did not finish there; run it again"):
        ImageDataModule(source=f"litdata:{out}").setup("fit")


def test_metadata_and_chunks_of_different_runs_are_refused(tmp_path: Path, shards_dir: tuple[Path, Path]) -> None:
    out = tmp_path / "shards"
    shutil.copytree(shards_dir[1], out)
    meta = shards.read_meta(str(out))
    meta["labels"]["train"] = meta["labels"]["train"][:-1]
    (out / shards.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"train holds \d+ images but .* labels \d+: .* not from one"):
        ImageDataModule(source=f"litdata:{out}").setup("fit")


def test_two_runs_into_one_folder_are_refused_and_out_inside_the_source_too(tmp_path: Path) -> None:
    root, out = _folder(tmp_path / "photos", per_class=3), tmp_path / "shards"
    out.mkdir()
    hold = f"import fcntl, time\nf = open({str(out / shards.LOCK_FILE)!r}, 'a')\nfcntl.lockf(f, fcntl.LOCK_EX)\n"
    other = subprocess.Popen([sys.executable, "-c", hold + "print('held', flush=True)\ntime.sleep(120)"], stdout=PIPE)
    try:  # another optimize is writing there
        assert other.stdout.readline() == b"held\n"
        with pytest.raises(RuntimeError, match="Another `tlkit optimize` is writing"):
            shards.optimize(source=f"folder:{root}", out=str(out))
    finally:
        other.kill()
        other.wait()
    assert not (out / "train").exists()
    # Inside the source, the shards folder became a "class" of the next run ("has no images")
    with pytest.raises(ValueError, match="inside the source folder"):
        shards.optimize(source=f"folder:{root}", out=str(root / "shards"))
    shards.optimize(source=f"folder:{root}", out=str(out), max_side=64)
    shutil.move(out, root / "shards")  # moved there by hand
    with pytest.raises(ValueError, match=r"holds shards written by `tlkit optimize`.*litdata:"):
        load_source(f"folder:{root}")


INTERRUPTED = """
import os, signal, sys
from tlkit.data import shards

def interrupt(self, sample):  # in litdata's worker process: Ctrl-C reaches the main process while it writes
    os.kill(os.getppid(), signal.SIGINT)
    return b""

shards._Encoder._encode = interrupt
if __name__ == "__main__":
    shards.optimize(source="folder:" + sys.argv[1], out=sys.argv[2])
"""


def test_ctrl_c_during_optimize_fails_and_the_callers_handler_comes_back(tmp_path: Path) -> None:
    """litdata's own SIGINT handler ends the process with status 0 (`tlkit optimize ... && tlkit fit` went on) and
    stayed installed after optimize returned, turning every later Ctrl-C into a silent exit 0."""
    root = _folder(tmp_path / "photos", per_class=3)
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    env = {**os.environ, "TLKIT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(script), str(root), str(tmp_path / "out")], env=env, timeout=300)
    assert done.returncode == 128 + signal.SIGINT
    assert not (tmp_path / "out" / shards.META_FILE).exists()
    before = signal.getsignal(signal.SIGINT)
    shards.optimize(source=f"folder:{root}", out=str(tmp_path / "out"), max_side=64)
    assert signal.getsignal(signal.SIGINT) is before
