"""Learning-rate range test on Lightning's ``Tuner.lr_find``, with fastai's suggestions next to Lightning's.

The test trains for ``num_training`` steps while the learning rate grows exponentially from ``min_lr`` to
``max_lr`` (Lightning's, on a copy of the weights it restores afterwards) and records the smoothed loss. Three
suggestions read that curve:

- ``steep``: Lightning's, where the loss falls fastest;
- ``valley``: fastai's, in the longest stretch where the loss keeps falling, two thirds of the way down it (less
  sensitive to noise than the steepest point);
- ``minimum_10``: a tenth of the learning rate at the lowest loss (fastai's ``minimum``), a conservative pick.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.tuner.lr_finder import _LRFinder
from matplotlib.figure import Figure

from tlkit.callbacks import phase_specs
from tlkit.io import atomic_open
from tlkit.module import TransferClassifier

SUGGESTIONS = ("valley", "steep", "minimum_10")


@dataclass
class LRSuggestions:
    """The learning rates the range test suggests (``None`` where the curve is too short), and the curve."""

    steep: float | None
    valley: float | None
    minimum_10: float | None
    lrs: list[float]
    losses: list[float]

    def pick(self, name: str) -> float:
        """The suggestion ``name`` (one of :data:`SUGGESTIONS`)."""
        if name not in SUGGESTIONS:
            raise ValueError(f"Unknown suggestion {name!r}; use one of {', '.join(SUGGESTIONS)}.")
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"The range test gave no {name} suggestion (too few finite losses); raise num_training.")
        return value


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """fastai's ``valley``: the longest run of decreasing losses (a longest decreasing subsequence), and the
    learning rate two thirds of the way along it."""
    points = [(lr, loss) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    if len(points) < 2:
        return None
    n = len(points)
    run = [1] * n  # run[i]: length of the longest decreasing subsequence ending at i
    start, end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if points[i][1] < points[j][1] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end, start = i, i - run[i]
    third = (end - start) / 3
    return points[start + int(third) + int(third / 2)][0]


def minimum_10(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """A tenth of the learning rate at the lowest finite loss."""
    finite = [(loss, lr) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    return min(finite)[1] / 10 if finite else None


def suggestions_of(finder: _LRFinder) -> LRSuggestions:
    """The three suggestions of a finished Lightning range test."""
    lrs, losses = list(finder.results["lr"]), [float(loss) for loss in finder.results["loss"]]
    steep = finder.suggestion() if len(lrs) > 12 else None  # Lightning skips the first 10 points and the last
    return LRSuggestions(steep, valley(lrs, losses), minimum_10(lrs, losses), lrs, losses)


def first_phase(model: TransferClassifier) -> TransferClassifier:
    """``model`` (its current weights) with its first fine-tuning phase only: the range test trains past epoch
    boundaries, where a phased model would change its frozen set and rebuild its optimiser mid-test."""
    accepted = inspect.signature(TransferClassifier).parameters  # (LightningCLI adds _class_path to hparams)
    hp = {key: value for key, value in model.hparams.items() if key in accepted}
    specs = phase_specs(hp.get("phases"), hp.get("freeze_epochs", 0), hp.get("freeze", "none"))
    if len(specs) == 1:
        return model
    single = TransferClassifier(**{**hp, "pretrained": False, "phases": [dict(specs[0], epochs=None)],
                                   "freeze_epochs": 0})  # fmt: skip
    single.load_state_dict(model.state_dict())
    return single


def find_lr(
    model: TransferClassifier,
    datamodule: L.LightningDataModule,
    trainer: L.Trainer,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_training: int = 100,
) -> tuple[LRSuggestions, Figure]:
    """Run the range test on ``model`` (its first phase) and return the suggestions and the loss-vs-LR figure.

    Example:
        >>> found, figure = find_lr(model, dm, L.Trainer(max_epochs=10))
        >>> found.valley, found.steep, found.minimum_10
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"min_lr={min_lr}, max_lr={max_lr}; the test needs 0 < min_lr < max_lr.")
    finder = Tuner(trainer).lr_find(
        first_phase(model), datamodule=datamodule, min_lr=min_lr, max_lr=max_lr, num_training=num_training,
        update_attr=False,
    )  # fmt: skip
    found = suggestions_of(finder)
    return found, curve_figure(finder, found)


def curve_figure(finder: _LRFinder, found: LRSuggestions) -> Figure:
    """Lightning's loss-vs-LR plot (with its steepest point) plus the valley and minimum/10 suggestions."""
    figure = finder.plot(suggest=found.steep is not None)
    ax = figure.axes[0]
    for name, style in (("valley", "g--"), ("minimum_10", "b:")):
        if (lr := getattr(found, name)) is not None:
            ax.axvline(lr, color=style[0], linestyle=style[1:], label=f"{name} {lr:.2g}")
    ax.legend()
    return figure


def apply_lr(recipe: str | os.PathLike, lr: float, out: str | os.PathLike) -> Path:
    """Write ``recipe`` with ``lr`` as its learning rate to ``out``: the first phase's ``lr`` for a recipe with
    ``phases``, else ``model.init_args.lr`` (which a ``freeze_epochs`` recipe's second phase inherits too)."""
    config = yaml.safe_load(Path(recipe).read_text())
    init_args = _model_init_args(config, recipe)
    if init_args.get("phases"):
        init_args["phases"][0]["lr"] = lr
    else:
        init_args["lr"] = lr
    with atomic_open(out, "w") as file:
        file.write(f"# {Path(recipe).name} with the learning rate from `tlkit lr-find`\n")
        yaml.safe_dump(config, file, sort_keys=False)
    return Path(out)


def _model_init_args(config: Any, recipe: str | os.PathLike) -> dict[str, Any]:
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"{recipe} has no model section; --apply needs a recipe with model.init_args (as fit).")
    return model.setdefault("init_args", {}) if "class_path" in model else model
