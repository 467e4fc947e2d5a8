"""Checks of a model and the data module it trains on, run when the Trainer brings them together.

Nothing flows here: the data module got its ``data_config`` at construction (from the model, or the CLI's link).
These checks only say when the pair would silently train something else than the user meant. They run in a
callback (:class:`PairingCheck`, which the model brings), because Lightning hands a callback both halves of the pair
(``trainer.datamodule`` and ``pl_module``); neither the model nor the data module looks the other up.
"""

from __future__ import annotations

import weakref
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from tlkit.data.datamodule import IMAGENET_DATA_CONFIG, ImageDataModule

_WARNED_FROZEN: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models already told (validate twice: one warning)
FITTED_PREPROCESSING = {
    "dataset": "normalised with this dataset's mean/std",
    "pca": "PCA-whitened",
    "zca": "ZCA-whitened",
}


class PairingCheck(Callback):
    """Runs :func:`check_pairing` on the model and the data module of every ``fit``/``validate``/``test``/
    ``predict``, at ``setup``, before any batch."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_pairing(pl_module, trainer.datamodule)


def check_pairing(model: nn.Module, datamodule: Any) -> None:
    """Raise when ``datamodule`` normalises for other weights than ``model``'s; warn (once per model) when it
    whitens the input of a frozen pretrained backbone.

    Raises:
        ValueError: an :class:`~tlkit.ImageDataModule` built without ``data_config`` (so with ImageNet's mean/std)
            in front of a backbone whose weights expect another mean/std.
    """
    if not isinstance(datamodule, ImageDataModule):
        return
    _check_label_kind(model, datamodule)
    _check_normalisation(model, datamodule)
    _warn_frozen_pretrained(model, datamodule)


def _check_label_kind(model: nn.Module, dm: ImageDataModule) -> None:
    """A multi-label source needs a multi-label model, and the other way round (the CLI links them; Python may not)."""
    wanted, built = dm.multilabel, bool(model.hparams.get("multilabel"))
    if wanted != built:
        kind = "multi-label (several labels per image)" if wanted else "single-label (one class per image)"
        raise ValueError(
            f"The data source {dm.hparams.source!r} is {kind}, but the model was built with multilabel={built}. "
            f"Build it with TransferClassifier(..., multilabel={wanted}) (the CLI passes the data module's)."
        )


def _check_normalisation(model: nn.Module, dm: ImageDataModule) -> None:
    hp, expected = dm.hparams, model.data_config
    if hp.data_config is not None or hp.preprocess != "pretrained" or (hp.mean is not None and hp.std is not None):
        return
    used = {k: tuple(IMAGENET_DATA_CONFIG[k]) for k in ("mean", "std")}
    wanted = {k: tuple(expected[k]) for k in ("mean", "std")}
    if used != wanted:
        raise ValueError(
            f"The ImageDataModule was built without data_config, so it normalises with ImageNet's {used}, but the "
            f"backbone {model.hparams.backbone!r} expects {wanted}. Build it with "
            "ImageDataModule(..., data_config=model.data_config)."
        )


def _warn_frozen_pretrained(model: nn.Module, dm: ImageDataModule) -> None:
    """Whitening or dataset statistics in front of a frozen pretrained backbone: say what that does, once."""
    kind = dm.hparams.preprocess
    if kind not in FITTED_PREPROCESSING or not model.hparams.get("pretrained") or model in _WARNED_FROZEN:
        return
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        return
    _WARNED_FROZEN.add(model)
    rank_zero_warn(
        f"preprocess={kind!r}: the images will be {FITTED_PREPROCESSING[kind]}, but the backbone is pretrained and "
        f"{len(frozen)} of its parameters are frozen. Those frozen layers learned their features on images "
        "normalised with the pretrained mean/std, and they cannot adapt to differently scaled or whitened "
        "inputs, so the features they give may be worse. Use preprocess='pretrained' with a frozen pretrained "
        "backbone, or unfreeze it (freeze='none') so it can adapt."
    )


__all__ = ["FITTED_PREPROCESSING", "PairingCheck", "check_pairing"]
