"""tlkit: transfer learning for image models on PyTorch Lightning."""

import os

# Every fresh CPU batch of float images (38 MB for 64 images of 224 px) otherwise costs a page fault per 4 KiB, making
# normalising on a CPU "device" 2-3x slower than the arithmetic. PyTorch's CPU allocator backs allocations of 2 MB and
# more with transparent huge pages when this is set; it reads the variable once, at its first allocation, so this
# must run before any tensor exists. A value the user set (THP_MEM_ALLOC_ENABLE=0 to opt out) is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from tlkit.backbones import Backbone, backbone_data_config, create_backbone, list_backbones
from tlkit.data import ImageDataModule
from tlkit.features import FeatureSet, extract_features
from tlkit.heads import ClassifierHead
from tlkit.io import AtomicCheckpointIO
from tlkit.module import TransferClassifier
from tlkit.probe import FeatureDataModule, LinearProbe

__all__ = [
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
]
__version__ = "0.1.0"
