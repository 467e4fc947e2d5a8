"""A user's first run: the README's main command (shortened) prints no warning the user cannot act on, ends with one
summary that says how to resume and evaluate, and evaluating the run writes into the run's own directory."""

from __future__ import annotations

import csv
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tlkit.cli import main
from tlkit.commands import LIBRARY_WARNINGS, quiet_library_noise

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
# Two short epochs (so that the best epoch is a choice); each override keeps the run free of warnings of its own:
# log_every_n_steps within an epoch, two validation batches (Lightning notes a limit of exactly 1), warmup < the run.
SHORT = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.log_every_n_steps", "3",
         "--trainer.limit_val_batches", "2"]  # fmt: skip
# Warning lines the quickstart may print, each with the reason the user cannot act on it. Keep it empty.
ALLOWED_WARNINGS: list[str] = []
# How warnings reach the terminal: Python's "file.py:12: Category: message" and Lightning's "file.py:12: message".
WARNING_LINE = re.compile(r"\S+\.py:\d+: ")
RUN = Path("runs") / "quickstart" / "version_0"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, str]:
    """``tlkit fit --config recipes/quickstart.yaml`` (short) in a fresh folder, every warning shown; returns the
    folder and everything the command printed."""
    cwd = tmp_path_factory.mktemp("first_run")
    env = {**os.environ, "PYTHONWARNINGS": "default", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline", "COLUMNS": "200"}  # fmt: skip
    command = [sys.executable, "-m", "tlkit.cli", "fit", "--config", str(QUICKSTART), *SHORT]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result.stdout + result.stderr


def test_the_quickstart_prints_no_warning_the_user_cannot_act_on(first_run):
    _, output = first_run
    warned = [line for line in output.splitlines() if WARNING_LINE.match(line) or "Tip:" in line]
    unexplained = [line for line in warned if not any(allowed in line for allowed in ALLOWED_WARNINGS)]
    assert unexplained == [], "\n".join(unexplained)
    assert "v_num" not in output  # the logger's version in the bar: the run directory is printed at the end
    assert "FLOPs" not in output  # nothing counts them (no example_input_array): no column of zeros


def test_fit_ends_with_best_epoch_timing_run_directory_and_the_commands_to_resume_and_evaluate(first_run):
    cwd, output = first_run
    summary = output[output.index("Trained in") :]
    rate = re.search(r"Trained in ([\d.]+) s: (\d+) training images at ([\d.]+) img/s", summary)
    assert rate and float(rate[1]) > 0 and int(rate[2]) == 2 * 3 * 32 and float(rate[3]) > 0
    rows = [r for r in csv.DictReader((cwd / RUN / "metrics.csv").open()) if r.get("val/acc")]
    best_row = max(rows, key=lambda r: float(r["val/acc"]))  # the first of equals, as ModelCheckpoint keeps it
    best = re.search(r"Best val/acc ([\d.]+) at epoch (\d+)", summary)
    assert (
        best
        and int(best[2]) == int(best_row["epoch"])
        and float(best[1]) == pytest.approx(float(best_row["val/acc"]), abs=1e-4)
    )
    assert f"Run directory: {RUN}" in summary
    resume = shlex.split(re.search(r"Resume.*?: (tlkit fit .*)", summary)[1])
    assert resume == ["tlkit", "fit", "--config", str(RUN / "config.yaml"), "--ckpt_path",
                      str(RUN / "checkpoints" / "last.ckpt")]  # fmt: skip
    evaluate = shlex.split(re.search(r"Evaluate: (tlkit validate .*?)  \(", summary)[1])
    assert evaluate == ["tlkit", "validate", "--config", str(RUN / "config.yaml"), "--ckpt_path",
                        str(RUN / "checkpoints" / f"best-epoch={best[2]}.ckpt")]  # fmt: skip
    assert all((cwd / path).is_file() for path in (resume[3], resume[5], evaluate[5]))


def test_validate_and_predict_of_a_run_write_into_its_directory_without_warnings(first_run, monkeypatch, capsys):
    cwd, _ = first_run
    monkeypatch.chdir(cwd)
    best = next((RUN / "checkpoints").glob("best-*.ckpt"))
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["validate", "--config", str(RUN / "config.yaml"), "--ckpt_path", str(best),
              "--trainer.limit_val_batches", "2"])  # fmt: skip
        main(["predict", "--config", str(RUN / "config.yaml"), "--ckpt_path", str(RUN / "checkpoints" / "last.ckpt"),
              "--trainer.limit_predict_batches", "1"])  # fmt: skip
    assert [str(w.message) for w in caught] == []  # "The dirpath has changed ..." among others
    assert warnings.filters == filters_before  # the command's filters end with it
    assert sorted(p.name for p in RUN.parent.iterdir()) == ["version_0"]  # no new version folder
    assert "val/acc" in (RUN / "validate" / "metrics.csv").read_text()
    assert (RUN / "validate" / "val_confusion_matrix.png").is_file()
    assert len(list(csv.DictReader((RUN / "predict" / "predictions.csv").open()))) == 32
    assert f"written to {RUN / 'predict' / 'predictions.csv'}" in capsys.readouterr().out


def test_a_checkpoint_outside_a_run_directory_is_evaluated_into_a_new_version(first_run, monkeypatch, tmp_path):
    cwd, _ = first_run
    monkeypatch.chdir(cwd)
    loose = shutil.copy(RUN / "checkpoints" / "last.ckpt", tmp_path / "model.ckpt")
    main(["validate", "--config", str(RUN / "config.yaml"), "--ckpt_path", str(loose),
          "--trainer.limit_val_batches", "1"])  # fmt: skip
    assert (RUN.parent / "version_1" / "metrics.csv").is_file()
    shutil.rmtree(RUN.parent / "version_1")  # the other tests of this module see the first run alone


@pytest.mark.parametrize("message, category, module", LIBRARY_WARNINGS)
def test_each_library_warning_is_ignored_only_from_its_own_module(message, category, module):
    text = re.sub(r"\\s\*|\\", "", message)  # the pattern's literal text: a message it matches
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_library_noise():
            warnings.warn_explicit(text, category, "x.py", 1, module=module)
            warnings.warn_explicit(text, category, "x.py", 1, module=f"{module}_other")
            warnings.warn_explicit(text, UserWarning if category is not UserWarning else RuntimeWarning, "x.py", 1,
                                   module=module)  # fmt: skip
            assert logger.filters  # the litlogger tip is dropped while the command runs
        assert not logger.filters
    assert [w.filename for w in caught] == ["x.py", "x.py"]  # the same text from elsewhere, or of another kind, shows


def test_plot_schedule_counts_the_curves_it_draws(tmp_path, capsys):
    out = tmp_path / "lr.png"
    main(["plot-schedule", "--config", str(QUICKSTART), "-o", str(out), "--trainer.max_epochs", "2"])
    line = capsys.readouterr().out
    curves, groups = map(int, re.search(r"(\d+) curves for (\d+) parameter groups", line).groups())
    assert out.is_file() and 1 <= curves < groups  # stages' weights and their no-decay biases share a curve
