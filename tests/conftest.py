"""Shared fixtures: tiny images, tiny Trainers, and an offline environment for every test."""

from __future__ import annotations

import os

import lightning as L
import pytest
import threadpoolctl
import torch
from torchvision.io import write_png


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test may reach the network: hub downloads fail fast instead of hanging."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.setenv("TLKIT_CACHE_DIR", str(tmp_path_factory.mktemp("tlkit_cache")))  # the image index


@pytest.fixture(autouse=True)
def deterministic_mode_off():
    """``Trainer(deterministic=True)`` switches torch's deterministic algorithms on for the rest of the process (also
    from a module-scoped fixture); every test starts with torch's default instead (torchmetrics, for one, counts
    without ``torch.bincount`` in deterministic mode)."""
    torch.use_deterministic_algorithms(False)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def no_run_seed():
    """``seed_everything`` writes ``PL_GLOBAL_SEED`` into the environment, where a data module without a ``seed`` of
    its own reads the run's seed: every test starts without one, as a fresh process does (a seed another test left
    behind changed the shuffle order of the next test in the same worker)."""
    os.environ.pop("PL_GLOBAL_SEED", None)
    yield
    os.environ.pop("PL_GLOBAL_SEED", None)


@pytest.fixture
def one_thread():
    """One intra-op thread for torch and for the BLAS under SciPy (whitening's eigh): on a shared 2-core machine,
    tiny tensors and two threads spinning against each other make a test up to 100x slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpoolctl.threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def tiny_trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
    )
    return L.Trainer(**{**defaults, **kwargs})


def write_image_folder(root, classes=("cat", "dog", "owl"), per_class=6, size=40, seed=0) -> str:
    """An ImageFolder tree of small PNGs whose colour depends on the class (so a model can learn it)."""
    generator = torch.Generator().manual_seed(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = torch.randint(0, 60, (3, size, size), dtype=torch.uint8, generator=generator)
            image[label % 3] += 180
            write_png(image, str(root / name / f"{i:03d}.png"))
    return str(root)
