"""Figures people would rather look at than read: confusion matrices, image grids and learning-rate schedules
(the schedules themselves are simulated by :mod:`tlkit.schedule`).

Everything draws on a bare :class:`matplotlib.figure.Figure` (no pyplot: no global state, no backend switch), so the
functions work the same in a training process, a notebook and a test. :func:`figure_to_array` turns a figure into
an ``(H, W, 3)`` uint8 array for loggers, :func:`save_figure` writes a PNG atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from tlkit.io import atomic_open


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> str:
    """Saves ``fig`` as a PNG, atomically (:func:`tlkit.io.atomic_open`).

    Returns:
        ``path`` as a string.
    """
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    return os.fspath(path)


def figure_to_array(fig: Figure, dpi: int = 100) -> np.ndarray:
    """Renders ``fig`` to an ``(H, W, 3)`` uint8 RGB array (what ``wandb.Image`` and TensorBoard's ``add_image``
    take)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_matrix_figure(matrix: Tensor | np.ndarray, class_names: Sequence[str], title: str = "") -> Figure:
    """Draws a confusion matrix: rows are true classes, columns predictions, colour the row-normalised rate.

    Counts are written in the cells when there are at most 20 classes.

    Args:
        matrix: ``(C, C)`` counts, ``matrix[true, predicted]`` (torchmetrics' ``MulticlassConfusionMatrix`` order).
        class_names: the ``C`` class names.
        title: figure title, e.g. ``"val, epoch 3: acc 0.91"``.
    """
    counts = np.asarray(matrix.cpu() if isinstance(matrix, Tensor) else matrix, dtype=np.int64)
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"confusion matrix has shape {counts.shape}, expected ({n}, {n}) for {n} class names.")
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * n + 2.0)
    fig = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i, j in np.ndindex(n, n):
            if counts[i, j]:
                colour = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=colour)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title}  (accuracy {accuracy:.3f})" if title else f"accuracy {accuracy:.3f}", fontsize=10)
    return fig


def pr_curves_figure(
    precision: Sequence[Tensor], recall: Sequence[Tensor], class_names: Sequence[str], title: str = ""
) -> Figure:
    """Draws one precision-recall curve per class (a multi-label model's confusion matrix), each labelled with its
    average precision, in a grid of small panels.

    Args:
        precision: per class, the precisions of torchmetrics' ``MultilabelPrecisionRecallCurve``.
        recall: per class, the matching recalls.
        class_names: the class names.
        title: figure title, e.g. ``"val, epoch 3"``.
    """
    n = len(class_names)
    if len(precision) != n or len(recall) != n:
        raise ValueError(f"need one precision and recall curve per class: {len(precision)}, {len(recall)} for {n}.")
    cols = min(5, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.2 * cols, 2.2 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    aps = []
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.set_axis_off()
            continue
        p, r = precision[k].float().cpu().numpy(), recall[k].float().cpu().numpy()
        ap = float(-np.sum(np.diff(r) * p[:-1]))  # step-wise area, torchmetrics' average precision
        aps.append(ap)
        ax.step(r, p, where="post", color="tab:blue")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{class_names[k]}  AP {ap:.2f}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("recall", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("precision", fontsize=8)
    mean_ap = float(np.nanmean(aps)) if aps else float("nan")
    fig.suptitle(f"{title}  (mAP {mean_ap:.3f})" if title else f"mAP {mean_ap:.3f}", fontsize=10)
    return fig


def image_grid_figure(images: Tensor, titles: Sequence[str], columns: int = 8, title: str = "") -> Figure:
    """Draws images in a grid with a small title under each (e.g. ``"true: cat / pred: dog"``).

    Args:
        images: ``(N, C, H, W)`` uint8, or float in ``[0, 1]``; C is 1 or 3.
        titles: one string per image.
        columns: images per row.
        title: figure title.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3) or len(titles) != len(images):
        raise ValueError(f"need (N, 1|3, H, W) images and N titles, got {tuple(images.shape)} and {len(titles)}.")
    n = max(len(images), 1)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.6 * cols, 1.8 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    pixels = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    pixels = pixels.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k < len(images):
            img = pixels[k]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(titles[k], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def display_images(images: Tensor, preprocess: torch.nn.Module | None = None) -> Tensor:
    """Model inputs back to displayable ``[0, 1]`` images.

    Normalisation (a ``mean``/``std`` module, like :class:`tlkit.data.preprocess.Normalize`) is inverted exactly;
    anything else (whitening) is shown with each image's mean +- 3 std mapped to ``[0, 1]``.
    """
    x = images.detach().float()
    mean, std = getattr(preprocess, "mean", None), getattr(preprocess, "std", None)
    if isinstance(mean, Tensor) and isinstance(std, Tensor) and mean.numel() == x.shape[1] == std.numel():
        return (x * std.to(x).view(1, -1, 1, 1) + mean.to(x).view(1, -1, 1, 1)).clamp(0, 1)
    centre = x.mean(dim=(1, 2, 3), keepdim=True)
    spread = x.std(dim=(1, 2, 3), keepdim=True)
    return ((x - centre) / (3 * spread + 1e-8)).clamp(-1, 1) * 0.5 + 0.5


def lr_schedule_figure(
    curves: dict[str, list[float]], steps_per_epoch: int | None = None, title: str = "learning rate"
) -> Figure:
    """Plots one learning-rate curve per parameter group against the optimiser step.

    Groups with the same curve (``"head"`` and ``"head/no_decay"``, or stages sharing a learning rate) are drawn
    once, labelled with all their names. Epoch boundaries are marked on a second x-axis.
    """
    shared: dict[tuple[float, ...], list[str]] = {}
    for name, values in curves.items():
        names = shared.setdefault(tuple(values), [])
        base = name.split("/")[0]  # "head/no_decay" is the biases of "head": same schedule, one name
        if base not in names:
            names.append(base)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for values, names in shared.items():
        label = ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} ... {names[-1]} ({len(names)} groups)"
        ax.plot(range(len(values)), values, label=label, linewidth=1.6)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("learning rate")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    total = max((len(v) for v in curves.values()), default=0)
    if steps_per_epoch and total:
        epochs = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
        epochs.set_xlabel("epoch")
    return fig


__all__ = [
    "confusion_matrix_figure",
    "pr_curves_figure",
    "display_images",
    "figure_to_array",
    "image_grid_figure",
    "lr_schedule_figure",
    "save_figure",
]
