"""tlkit: transfer learning for image models on PyTorch Lightning."""

from tlkit.backbones import Backbone, create_backbone, list_backbones
from tlkit.data import ImageDataModule
from tlkit.heads import ClassifierHead
from tlkit.module import TransferClassifier

__all__ = [
    "Backbone",
    "ClassifierHead",
    "ImageDataModule",
    "TransferClassifier",
    "create_backbone",
    "list_backbones",
]
__version__ = "0.1.0"
