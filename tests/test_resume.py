"""A resumed run is the same run: bit-identical weights on the CPU after resuming from an epoch-end or a mid-epoch
checkpoint, across a fine-tuning phase change, with the balanced sampler, under 2-process DDP, and after a SIGKILL.

Every run is shuffled, augmented (``augment="basic"``) in 2 loader workers, with dropout (tests/_resume_run.py).
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _resume_run import BATCHES, EPOCHS, run

from tlkit import ImageDataModule
from tlkit.resume import collect_rng_states, set_rng_states

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(__file__).with_name("_resume_run.py")
TOTAL_STEPS = EPOCHS * BATCHES


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def assert_same_run(full: dict, resumed: dict, steps_at_checkpoint: int) -> None:
    diff = max_abs_difference(full["weights"], resumed["weights"])
    assert diff == 0, f"resumed weights differ from the uninterrupted run's by up to {diff}"
    assert resumed["global_step"] == full["global_step"] == TOTAL_STEPS
    assert resumed["trained"] == TOTAL_STEPS - steps_at_checkpoint, "batches skipped or trained twice"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("full")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests (one_thread): another thread count sums in another order
    try:
        return run(out, "full"), out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("checkpoint", "steps"),
    [
        ("end-epoch=0.ckpt", 5),  # epoch end, before the phase change
        ("epoch=0-step=3.ckpt", 3),  # mid-epoch, before the phase change
        ("epoch=1-step=6.ckpt", 6),  # mid-epoch, after the phase change
        ("end-epoch=1.ckpt", 10),  # epoch end, after the phase change
    ],
)
def test_resumed_run_is_bit_identical(full_run, tmp_path: Path, checkpoint: str, steps: int) -> None:
    full, out = full_run
    resumed = run(tmp_path, "resumed", resume=out / checkpoint)
    assert_same_run(full, resumed, steps)


def test_a_lora_run_resumed_mid_epoch_after_the_phase_change_is_bit_identical(tmp_path: Path) -> None:
    lora = {"kind": "lora", "r": 4, "alpha": 8}
    for name in ("full", "resumed"):
        (tmp_path / name).mkdir()
    full = run(tmp_path / "full", "full", adapter=lora)
    assert any("lora_B" in name for name in full["weights"])
    resumed = run(tmp_path / "resumed", "resumed", resume=tmp_path / "full" / "epoch=1-step=6.ckpt", adapter=lora)
    assert_same_run(full, resumed, 6)


def test_resuming_on_another_number_of_processes_warns_that_it_cannot_be_exact(full_run, tmp_path: Path) -> None:
    _, out = full_run
    checkpoint = torch.load(out / "end-epoch=1.ckpt", weights_only=True)
    states = checkpoint["callbacks"]["RngStateCheckpoint"]["per_rank"]
    checkpoint["callbacks"]["RngStateCheckpoint"]["per_rank"] = states * 2  # as if written by 2 processes
    torch.save(checkpoint, tmp_path / "two_processes.ckpt")
    with pytest.warns(UserWarning, match="random states of 2 process"):
        run(tmp_path, "resumed", resume=tmp_path / "two_processes.ckpt")


def test_balanced_sampler_resumes_mid_epoch(tmp_path: Path) -> None:
    full = run(tmp_path, "full", sampler="balanced")
    resumed = run(tmp_path / "resumed", "resumed", resume=tmp_path / "epoch=1-step=9.ckpt", sampler="balanced")
    assert_same_run(full, resumed, 9)


def test_run_killed_at_a_random_step_resumes_from_last_checkpoint(full_run, tmp_path: Path) -> None:
    full, _ = full_run
    step = random.Random(12).randint(2, TOTAL_STEPS - 1)
    print(f"SIGKILL after optimizer step {step}; last.ckpt holds step {step - 1}")
    killed = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "killed", "--kill-at-step", str(step)])
    assert killed.returncode == -9, f"the run was not killed (exit code {killed.returncode})"
    assert not (tmp_path / "killed_rank0.pt").exists()
    resumed = run(tmp_path / "resumed", "resumed", resume=tmp_path / "last.ckpt")
    assert_same_run(full, resumed, step - 1)


def test_ddp_run_resumed_mid_epoch_is_bit_identical_on_every_rank(tmp_path: Path) -> None:
    def launch(tag: str, *extra: str) -> None:
        command = [sys.executable, str(SCRIPT), str(tmp_path), tag, "--devices", "2", *extra]
        subprocess.run(command, check=True, timeout=240)

    launch("full")
    launch("resumed", "--resume", str(tmp_path / "epoch=1-step=6.ckpt"))  # mid-epoch 1, after the phase change
    for rank in (0, 1):
        full = torch.load(tmp_path / f"full_rank{rank}.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"resumed_rank{rank}.pt", weights_only=True)
        diff = max_abs_difference(full["weights"], resumed["weights"])
        assert diff == 0, f"rank {rank}: resumed weights differ by up to {diff}"
        assert resumed["global_step"] == full["global_step"] and resumed["trained"] == full["global_step"] - 6
    # The ranks are seeded differently (_resume_run.make), yet share one order: their shares of it are disjoint.
    shares = [torch.load(tmp_path / f"full_rank{rank}.pt", weights_only=True)["last_epoch_order"] for rank in (0, 1)]
    assert shares[0] and not set(shares[0]) & set(shares[1])


@pytest.mark.parametrize("sampler", [None, "balanced"])
def test_train_order_is_a_function_of_seed_and_epoch(sampler: str | None) -> None:
    def order(epoch: int, seed: int = 0) -> list[int]:
        loader = ImageDataModule("digits", image_size=8, seed=seed, sampler=sampler).train_dataloader()
        loader.sampler.set_epoch(epoch)
        worker_seed = int(torch.empty((), dtype=torch.int64).random_(generator=loader.generator))
        return [*loader.sampler, worker_seed]

    assert order(3) == order(3)  # a resumed run draws what the interrupted one drew in that epoch
    assert order(3) != order(4) and order(3) != order(3, seed=1)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    states = collect_rng_states()
    expected = (torch.rand(3), random.random(), __import__("numpy").random.rand())
    torch.save({"per_rank": [states]}, tmp_path / "states.pt")
    set_rng_states(torch.load(tmp_path / "states.pt", weights_only=True)["per_rank"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), __import__("numpy").random.rand()) == expected[1:]
