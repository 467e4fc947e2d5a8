"""tlkit: transfer learning for image models on PyTorch Lightning.

The public names are imported on first use (PEP 562), so ``import tlkit`` (and the ``tlkit`` command's help) does not
pay for Lightning and timm until something needs them. Importing tlkit changes no environment variable and installs
no warnings filter.

Preprocessing on a CPU device (each batch normalised in the main process) is faster when PyTorch backs large tensors
with huge pages instead of faulting in every 4 KiB page (~0.1 ms instead of ~0.4 ms per 224-px image, see
benchmarks/data_throughput.py): the ``tlkit`` command turns this on; in your own script, run
``os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")`` before importing torch (PyTorch reads it at its first
allocation).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "AtomicCheckpointIO": "tlkit.io",
    "Backbone": "tlkit.backbones",
    "ClassifierHead": "tlkit.heads",
    "FeatureDataModule": "tlkit.probe",
    "FeatureSet": "tlkit.features",
    "ImageDataModule": "tlkit.data",
    "LinearProbe": "tlkit.probe",
    "TransferClassifier": "tlkit.module",
    "backbone_data_config": "tlkit.backbones",
    "create_backbone": "tlkit.backbones",
    "extract_features": "tlkit.features",
    "list_backbones": "tlkit.backbones",
    "recipe_lr_schedule": "tlkit.commands",
}
__all__ = [  # written out (not sorted(_EXPORTS)) so that linters and IDEs read it
    "AtomicCheckpointIO",
    "Backbone",
    "ClassifierHead",
    "FeatureDataModule",
    "FeatureSet",
    "ImageDataModule",
    "LinearProbe",
    "TransferClassifier",
    "backbone_data_config",
    "create_backbone",
    "extract_features",
    "list_backbones",
    "recipe_lr_schedule",
]
__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and IDEs read; at run time __getattr__ imports each name on first use
    from tlkit.backbones import Backbone, backbone_data_config, create_backbone, list_backbones
    from tlkit.commands import recipe_lr_schedule
    from tlkit.data import ImageDataModule
    from tlkit.features import FeatureSet, extract_features
    from tlkit.heads import ClassifierHead
    from tlkit.io import AtomicCheckpointIO
    from tlkit.module import TransferClassifier
    from tlkit.probe import FeatureDataModule, LinearProbe


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tlkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
