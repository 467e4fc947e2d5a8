"""Run safety: checkpoints survive SIGKILL during a write whatever TMPDIR is, a run directory belongs to one run
(also for two `tlkit fit` started together), and no secret from the environment or the command line reaches any
file of a run, W&B's staging and cache included."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace

import tlkit.io
from tlkit.cli import claim_version_folders
from tlkit.io import AtomicCheckpointIO, atomic_open, atomic_path, claim_version, remove_stale_temporaries
from tlkit.module import read_checkpoint
from tlkit.secrets import REDACTED, scrub_secrets, secret_values

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "dummy0wandb0key0" + "0123456789abcdef" * 2  # 48 characters, like a real W&B key
ENV_TOKEN = "svc-token-4f1c9a7e2b"  # only secret because of the environment variable's name
CLI_TOKEN = "hf_" + "Q7aZ" * 6  # only on the command line: secret by its shape (a Hugging Face token)
FORK = multiprocessing.get_context("fork")  # the child shares the imported torch: a kill round takes milliseconds


# ------------------------------------------------------------------------------------------------ atomic writes


def _rewrite_forever(path: str, weights: torch.Tensor, ready) -> None:
    """What a training run does to last.ckpt, as fast as it can: each write holds its own step number."""
    io = AtomicCheckpointIO()
    step = 0
    while True:
        step += 1
        io.save_checkpoint({"state_dict": {"w": weights}, "global_step": step, "hyper_parameters": {}}, path)
        ready.set()


def _kill_during_writes(folder: Path, kills: int) -> tuple[list[int], int]:
    """SIGKILLs a rewriting child ``kills`` times at random moments; returns the step found in last.ckpt after
    each kill (it must load: the complete previous or the complete new checkpoint) and how many kills left another
    file next to it."""
    path = folder / "last.ckpt"
    weights = torch.randn(2_000_000)  # 8 MB: a write takes milliseconds, so most kills land inside one
    rng, steps, kills_leaving_a_file = random.Random(0), [], 0
    for _ in range(kills):
        ready = FORK.Event()
        child = FORK.Process(target=_rewrite_forever, args=(str(path), weights, ready), daemon=True)
        child.start()
        assert ready.wait(30), "the child wrote no checkpoint"
        time.sleep(rng.uniform(0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        steps.append(read_checkpoint(path)["global_step"])  # raises on a truncated or empty file
        left = [p for p in folder.iterdir() if p != path]
        assert len(left) <= 1, left  # each write removes the files of writers that are gone
        kills_leaving_a_file += bool(left)
    return steps, kills_leaving_a_file


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "named-temporary"])
def test_last_ckpt_survives_sigkill_during_rewrites_with_tmpdir_on_another_file_system(tmp_path, monkeypatch, unnamed):
    """30 kills of a process rewriting last.ckpt, TMPDIR on /dev/shm (another file system than tmp_path): after
    every kill last.ckpt loads. With O_TMPFILE (Linux) a kill while writing leaves nothing (only a kill in the
    microseconds between naming the complete file and renaming it leaves one); with named temporary files (other
    systems) most kills leave the writer's file. Either way the next write removes it."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.fail("this test needs /dev/shm on another file system than the test's tmp_path")
    tmpdir = shm / f"tlkit-test-{os.getpid()}"
    tmpdir.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr("tempfile.tempdir", None)  # the tempfile module caches TMPDIR on first use
    if not unnamed:
        monkeypatch.setattr(tlkit.io, "_unnamed_file", lambda folder: None)
    try:
        steps, kills_leaving_a_file = _kill_during_writes(tmp_path, kills=30)
        left_in_tmpdir = list(tmpdir.iterdir())
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()
    assert len(set(steps)) > 1  # the kills interrupted a process that was writing, at different points
    assert left_in_tmpdir == []  # nothing went through TMPDIR
    if unnamed:
        assert kills_leaving_a_file <= 3  # a kill lands in the link-to-rename window about once in hundreds
    else:
        assert kills_leaving_a_file >= 10  # a kill mid-write leaves the named temporary...
    with atomic_open(tmp_path / "last.ckpt") as f:
        torch.save({"global_step": -1}, f)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # ...until the next write


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old: 1\n")
    for write in (lambda: atomic_open(path, "w"), lambda: atomic_path(path)):
        with pytest.raises(RuntimeError, match="boom"), write() as target:
            if isinstance(target, Path):
                target.write_text("new: half")
            else:
                target.write("new: half")
            raise RuntimeError("boom")
        assert path.read_text() == "old: 1\n"
        assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    with pytest.raises(ValueError, match="whole file"):
        atomic_open(path, "a").__enter__()


def test_atomic_writes_get_the_usual_permissions_and_replace_the_file(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "a.csv", "w", newline="") as f:
            f.write("x\n")
        with atomic_path(tmp_path / "b.safetensors") as tmp:
            tmp.write_bytes(b"b")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.csv").read_text() == "x\n" and (tmp_path / "b.safetensors").read_bytes() == b"b"
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"0o644"}  # not mkstemp's 0o600


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = FORK.Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    stale = tmp_path / f".last.ckpt.{dead.pid}.ab12cd34.tmp"
    live = tmp_path / f".last.ckpt.{os.getppid()}.ab12cd34.tmp"  # pytest's parent: alive
    other = tmp_path / f".last.ckpt.bak.{dead.pid}.x.tmp"  # another file's temporary
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path / "last.ckpt") == [stale]
    assert live.exists() and other.exists()


# ------------------------------------------------------------------------------------------------ run folders


def _claim(root: Path, barrier, results) -> None:
    barrier.wait()
    results.append(claim_version(root))


def _claim_in_process(root: Path, barrier, queue) -> None:
    barrier.wait()
    queue.put(claim_version(root))


def test_claim_version_gives_distinct_folders_to_threads_and_processes_claiming_at_once(tmp_path):
    threads_n, processes_n = 16, 8
    barrier = FORK.Barrier(processes_n)
    queue = FORK.Queue()
    processes = [FORK.Process(target=_claim_in_process, args=(tmp_path, barrier, queue)) for _ in range(processes_n)]
    for process in processes:
        process.start()
    from_processes = [queue.get(timeout=30) for _ in processes]
    for process in processes:
        process.join()
    thread_barrier, from_threads = threading.Barrier(threads_n), []
    threads = [threading.Thread(target=_claim, args=(tmp_path, thread_barrier, from_threads)) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = from_processes + from_threads
    assert sorted(claimed) == list(range(threads_n + processes_n))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"version_{v}" for v in claimed)


def test_default_logger_and_recipe_loggers_get_claimed_folders(tmp_path):
    csv = Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=str(tmp_path)))
    fixed = Namespace(
        class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=str(tmp_path), version=7)
    )
    wandb = Namespace(class_path="tlkit.tracking.WandbLogger", init_args=Namespace(save_dir=str(tmp_path)))
    config = Namespace(logger=[csv, fixed, wandb])
    assert len(claim_version_folders(config)) == 1
    assert csv.init_args.version == 0 and fixed.init_args.version == 7 and wandb.init_args.get("version") is None
    for unset in (None, True):
        default = Namespace(logger=unset, default_root_dir=str(tmp_path / "root"))
        claim_version_folders(default)
        assert default.logger.class_path.endswith("TensorBoardLogger")  # what Lightning would create
    assert sorted(p.name for p in (tmp_path / "root" / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    assert claim_version_folders(Namespace(logger=False)) == []


RECIPE = """
seed_everything: 0
trainer:
  max_epochs: 1
  accelerator: cpu
  limit_train_batches: 3
  limit_val_batches: 1
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  logger: {logger}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{filename: last, enable_version_counter: false}}
model:
  class_path: tlkit.TransferClassifier
  init_args: {{backbone: test_efficientnet}}
data:
  class_path: tlkit.ImageDataModule
  init_args: {{source: textures, image_size: 32, batch_size: 8, augment: none, num_workers: 0}}
"""


def _start_fit(cwd: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    cmd = [sys.executable, "-m", "tlkit.cli", "fit", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, out[-3000:]


def test_two_fits_started_together_with_the_same_root_get_their_own_run_folders(tmp_path):
    root = tmp_path / "runs"
    logger = f'{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {root}, name: ""}}}}'
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=root, logger=logger))
    lrs = ["0.011", "0.022"]
    _finish([_start_fit(tmp_path, ["--config", str(recipe), "--model.init_args.lr", lr], {}) for lr in lrs])

    runs = sorted(root.glob("version_*"))
    assert [run.name for run in runs] == ["version_0", "version_1"]
    found = []
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["trainer"]["logger"]["init_args"]["version"] is None  # run again, it claims a new folder
        lr = config["model"]["init_args"]["lr"]
        assert read_checkpoint(run / "checkpoints" / "last.ckpt")["hyper_parameters"]["lr"] == lr  # its own weights
        steps = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()[1:]]
        header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
        step_column = header.index("step")
        assert sorted({int(row[step_column]) for row in steps}) == [0, 1, 2]  # one run's steps, not two
        found.append(lr)
    assert sorted(found) == sorted(float(lr) for lr in lrs)


# ------------------------------------------------------------------------------------------------ W&B and secrets


def _wait_until_settled(tree: Path, quiet_s: float = 2.0, limit_s: float = 120.0) -> None:
    """Wait until no file under ``tree`` changes for ``quiet_s``: W&B's service process (wandb-core) may still
    be flushing the offline run after the fit's process has exited, more so on a loaded machine."""

    def snapshot() -> dict[Path, tuple[int, int]]:
        state = {}
        for path in tree.rglob("*"):
            with contextlib.suppress(FileNotFoundError):  # a temporary file gone between listing and stat
                stat = path.stat()
                state[path] = (stat.st_size, stat.st_mtime_ns)
        return state

    deadline, before = time.monotonic() + limit_s, snapshot()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        if (after := snapshot()) == before:
            return
        before = after


def _files_with(tree: Path, *secrets: str) -> list[str]:
    return [
        f"{path.relative_to(tree)} holds {secret[:8]}..."
        for path in tree.rglob("*")
        if path.is_file()
        for secret in secrets
        if secret.encode() in path.read_bytes()
    ]


def test_wandb_recipe_keeps_config_in_the_run_folder_and_no_file_holds_a_secret(tmp_path):
    """The W&B recipe, offline with log_model (artifacts staged): W&B's cache, data, config and temporary folders,
    HOME and the run tree all lie under tmp_path, and no byte of any file there holds a secret passed through the
    environment or the command line."""
    runs = tmp_path / "runs"
    folders = {name: tmp_path / name for name in ("home", "tmp", "wandb_cache", "wandb_data", "wandb_config")}
    for folder in folders.values():
        folder.mkdir()
    env = {
        "HOME": str(folders["home"]), "TMPDIR": str(folders["tmp"]), "WANDB_MODE": "offline",
        "WANDB_CACHE_DIR": str(folders["wandb_cache"]), "WANDB_DATA_DIR": str(folders["wandb_data"]),
        "WANDB_CONFIG_DIR": str(folders["wandb_config"]),
        "WANDB_API_KEY": API_KEY, "MY_SERVICE_TOKEN": ENV_TOKEN,
    }  # fmt: skip
    args = [
        "--config", str(ROOT / "recipes" / "quickstart_wandb.yaml"),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(runs),
        "--trainer.logger.init_args.save_dir", str(runs),
        "--model.init_args.backbone", "test_efficientnet", "--model.init_args.pretrained", "false",
        "--data.init_args.image_size", "32", "--data.init_args.num_workers", "0",
        "--data.init_args.predict_source", f"folder:/data/{ENV_TOKEN}",  # an environment secret on the command line
        "--trainer.logger.init_args.notes", f"weights pulled with {CLI_TOKEN}",  # goes to wandb.init as it is
    ]  # fmt: skip
    _finish([_start_fit(tmp_path, args, env)])
    _wait_until_settled(tmp_path)

    assert not (runs / "config.yaml").exists()  # not at the save_dir root, where every run would overwrite it
    (wandb_run,) = runs.glob("wandb/offline-run-*")
    run = runs / "tlkit" / wandb_run.name.rsplit("-", 1)[1]  # save_dir/<project>/<run id>
    assert (run / "checkpoints" / "last.ckpt").is_file()
    data = yaml.safe_load((run / "config.yaml").read_text())["data"]["init_args"]
    assert data["predict_source"] == f"folder:/data/{REDACTED}"  # the secret reached the config, scrubbed
    hparams = read_checkpoint(run / "checkpoints" / "last.ckpt")["datamodule_hyper_parameters"]
    assert hparams["predict_source"] == f"folder:/data/{REDACTED}"
    assert f"weights pulled with {REDACTED}".encode() in next(wandb_run.glob("*.wandb")).read_bytes()
    assert list((folders["wandb_data"] / "artifacts" / "staging").iterdir())  # log_model staged the checkpoints

    assert _files_with(tmp_path, API_KEY, ENV_TOKEN, CLI_TOKEN) == []


def test_secret_rule_environment_names_command_line_options_and_token_shapes():
    environ = {"WANDB_API_KEY": API_KEY, "DB_PASSWORD": "hunter22", "HOME": "/home/someone", "SHORT_TOKEN": "1"}
    environ |= {"DESKTOP_SESSION": "ubuntu", "GIT_AUTHOR_NAME": "someone"}  # names that hold no secret
    argv = ["fit", "--model.init_args.api_key", "k-123456", "--data.token=t-123456", "--trainer.max_epochs", "3"]
    assert secret_values(environ, argv) == {
        API_KEY: "WANDB_API_KEY",
        "hunter22": "DB_PASSWORD",
        "k-123456": "model.init_args.api_key",
        "t-123456": "data.token",
    }
    shapes = {
        "https://user:pa55word@host/x": f"https://user:{REDACTED}@host/x",
        "s3://b/k?X-Amz-Signature=abcdef&sig=012345": f"s3://b/k?X-Amz-Signature={REDACTED}&sig={REDACTED}",
        f"folder:/data/{CLI_TOKEN}/x": f"folder:/data/{REDACTED}/x",
        "key AKIAABCDEFGHIJKLMNOP here": f"key {REDACTED} here",
        "/data/run-2024/images": "/data/run-2024/images",
    }
    assert {text: scrub_secrets(text, {}) for text in shapes} == shapes
    config = {"logger": {"api_key": "plain-value", "monitor": "val/acc"}, "paths": [f"/x/{API_KEY}"], "n": 3}
    assert scrub_secrets(config, {API_KEY: "WANDB_API_KEY"}) == {
        "logger": {"api_key": REDACTED, "monitor": "val/acc"},
        "paths": [f"/x/{REDACTED}"],
        "n": 3,
    }
