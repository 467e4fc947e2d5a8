"""recipes/strong.yaml trains end to end through the CLI: both phases, the EMA and flip TTA."""

from __future__ import annotations

import csv
from pathlib import Path

from tlkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_strong_recipe_trains_with_phases_ema_and_tta(tmp_path):
    main(["fit", "--config", str(ROOT / "recipes" / "strong.yaml"), "--trainer.max_epochs", "2",
          "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--data.init_args.num_workers", "0"])  # fmt: skip
    with open(tmp_path / "version_0" / "metrics.csv") as file:
        logged = {key for row in csv.DictReader(file) for key, value in row.items() if value}
    assert {"val/acc", "val/tta_acc", "lr/head"} <= logged
    assert any(key.startswith("lr/") and key != "lr/head" for key in logged)  # the second phase trains the backbone
    assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").is_file()
