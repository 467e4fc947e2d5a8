"""Checkpoint soups (Wortsman et al., 2022): the average of fine-tuned weights, uniform or greedy.

Uniform: the mean of every checkpoint. Greedy: checkpoints sorted by their own validation accuracy, best first;
each is added to the soup only if the soup's validation accuracy does not drop, so the result is never below the
best single checkpoint. BatchNorm running statistics that differ between the checkpoints are re-estimated on the
train data after averaging (an average of statistics is not the statistics of the averaged weights); those that
are equal in all of them (frozen layers) are kept.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from tlkit.data.datamodule import ImageDataModule
from tlkit.io import atomic_open
from tlkit.module import TransferClassifier, read_checkpoint

# Entries of a training checkpoint that describe one run's optimiser and loop, not the averaged weights: a soup
# drops them (it evaluates, predicts and exports like any checkpoint; fine-tuning it further starts a new run).
TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks", "current_model_state",
                       "averaging_state")  # fmt: skip


@dataclass
class Soup:
    """What :func:`make_soup` found: each checkpoint's val accuracy, the ones in the soup, the soup's accuracy
    (for a multi-label model ``metric`` is ``val/map`` and the scores are mAPs)."""

    scores: dict[str, float]
    ingredients: list[str]
    val_acc: float
    tried: list[tuple[str, float, bool]] = field(default_factory=list)  # greedy: (checkpoint, soup acc, kept)
    metric: str = "val/acc"


def make_soup(
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    greedy: bool = False,
    datamodule: ImageDataModule | None = None,
    bn_batches: int | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> Soup:
    """Average fine-tuned checkpoints of one model into a new checkpoint that every tlkit command accepts.

    Args:
        checkpoints: ``.ckpt`` files of the same model (same backbone, head and classes), e.g. a run's best
            epochs or runs with different seeds or learning rates.
        out: the checkpoint to write (atomically).
        greedy: greedy soup; otherwise uniform.
        datamodule: the data to validate on and re-estimate BatchNorm with; default: the one saved in the first
            checkpoint (its ``datamodule_hyper_parameters``).
        bn_batches: train batches for the BatchNorm re-estimate (default: one epoch).
        trainer_kwargs: Trainer options for the validations (``accelerator``, ``devices``, ``precision``).

    Example:
        >>> soup = make_soup(["runs/a/best.ckpt", "runs/b/best.ckpt"], "soup.ckpt", greedy=True)
        >>> soup.val_acc, soup.ingredients
    """
    if len(checkpoints) < 2:
        raise ValueError(f"A soup needs at least two checkpoints, got {len(checkpoints)}: {list(checkpoints)}.")
    paths = [str(path) for path in checkpoints]
    states = {path: read_checkpoint(path) for path in paths}
    check_same_model(states)
    model = TransferClassifier.load_from_checkpoint(paths[0], map_location="cpu")
    datamodule = datamodule or datamodule_of(states[paths[0]], model)
    trainer = L.Trainer(**_quiet_trainer_kwargs(trainer_kwargs))
    weights = {path: checkpoint["state_dict"] for path, checkpoint in states.items()}
    metric = "val/map" if model.hparams.multilabel else "val/acc"  # exact match is too coarse to choose by

    def score(ingredients: list[str]) -> float:
        load_average(model, [weights[path] for path in ingredients], datamodule, bn_batches)
        return float(trainer.validate(model, datamodule=datamodule, verbose=False)[0][metric])

    scores = {path: score([path]) for path in paths}
    if greedy:
        ranked = sorted(paths, key=scores.__getitem__, reverse=True)
        ingredients, best, tried = [ranked[0]], scores[ranked[0]], []
        for path in ranked[1:]:
            acc = score([*ingredients, path])
            tried.append((path, acc, acc >= best))
            if acc >= best:
                ingredients, best = [*ingredients, path], acc
        soup = Soup(scores, ingredients, best, tried, metric)
    else:
        soup = Soup(scores, paths, score(paths), metric=metric)
    if model.hparams.multilabel:
        score(soup.ingredients)  # validated once more: a multi-label model's thresholds are tuned on the soup itself
    else:
        load_average(model, [weights[path] for path in soup.ingredients], datamodule, bn_batches)
    save_soup(states[soup.ingredients[0]], model, soup, out)
    return soup


def check_same_model(states: dict[str, dict[str, Any]]) -> None:
    """Raises a ``ValueError`` naming the checkpoint whose weights (names or shapes) differ from the first's."""
    (first, reference), *others = states.items()
    expected = {name: tuple(t.shape) for name, t in reference["state_dict"].items()}
    for path, checkpoint in others:
        found = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items()}
        if found != expected:
            differ = sorted(set(found.items()) ^ set(expected.items()))[:3]
            raise ValueError(
                f"{path} is not the same model as {first} (weights differ: {differ}); a soup averages checkpoints "
                "of one model: same backbone, head and classes."
            )


def average_weights(state_dicts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The element-wise mean of floating-point tensors; other entries (BatchNorm's step counters) from the first."""
    first = state_dicts[0]
    return {
        name: torch.stack([sd[name].float() for sd in state_dicts]).mean(0).to(t.dtype) if t.is_floating_point()
        else t.clone()
        for name, t in first.items()
    }  # fmt: skip


def load_average(
    model: TransferClassifier,
    state_dicts: Sequence[dict[str, Tensor]],
    datamodule: ImageDataModule,
    bn_batches: int | None = None,
) -> None:
    """Load the average of ``state_dicts`` into ``model`` and re-estimate the BatchNorm statistics that differ
    between them (none for a single checkpoint)."""
    model.load_state_dict(average_weights(state_dicts))
    differing = {
        name.rsplit(".", 1)[0]
        for name, t in state_dicts[0].items()
        if name.endswith("running_mean") and any(not torch.equal(t, sd[name]) for sd in state_dicts[1:])
    }
    if differing:
        reestimate_batchnorm(model, datamodule, differing, bn_batches)


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module, datamodule: ImageDataModule, layers: set[str], max_batches: int | None = None
) -> None:
    """Running statistics of the BatchNorm ``layers`` (module names) as a cumulative average over train batches
    (``momentum=None``, as ``torch.optim.swa_utils.update_bn``), every other layer in eval mode and unchanged."""
    modules = dict(model.named_modules())
    norms = [modules[name] for name in sorted(layers)]
    momenta = [m.momentum for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    datamodule.setup("fit")
    device = next(model.parameters()).device
    for i, (images, _) in enumerate(datamodule.train_dataloader()):
        if max_batches is not None and i >= max_batches:
            break
        model(datamodule.normalize(images.to(device)))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def datamodule_of(checkpoint: dict[str, Any], model: TransferClassifier) -> ImageDataModule:
    """The data module a checkpoint was trained with (its saved arguments), paired with ``model``."""
    hp = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if not hp:
        raise ValueError(
            "The checkpoint holds no data module arguments (it was not written by `tlkit fit`); pass the data to "
            "validate on: make_soup(..., datamodule=ImageDataModule(...))."
        )
    hp = {key: value for key, value in hp.items() if not key.startswith("_")}  # LightningCLI's _class_path
    hp["data_config"] = model.data_config
    return ImageDataModule(**hp)


def save_soup(template: dict[str, Any], model: TransferClassifier, soup: Soup, out: str | os.PathLike) -> Path:
    """Write the soup as ``template`` (its best ingredient's checkpoint) with the averaged weights, without the
    ingredient's optimiser and loop state, and with ``tlkit_soup``: the ingredients and accuracies."""
    checkpoint = {key: value for key, value in template.items() if key not in TRAINING_STATE_KEYS}
    checkpoint["state_dict"] = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    model.on_save_checkpoint(checkpoint)  # what the model adds to its checkpoints (a multi-label model's thresholds)
    checkpoint["tlkit_soup"] = {"ingredients": soup.ingredients, "scores": soup.scores, "val_acc": soup.val_acc}
    with atomic_open(out, "wb") as file:
        torch.save(checkpoint, file)
    return Path(out)


def _quiet_trainer_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return {**defaults, **(kwargs or {})}
