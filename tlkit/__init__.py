"""tlkit: transfer learning for image models on PyTorch Lightning."""

from tlkit.backbones import Backbone, create_backbone, list_backbones
from tlkit.data import ImageDataModule
from tlkit.features import FeatureSet, extract_features
from tlkit.heads import ClassifierHead
from tlkit.module import TransferClassifier

__all__ = [
    "Backbone",
    "ClassifierHead",
    "FeatureSet",
    "ImageDataModule",
    "TransferClassifier",
    "create_backbone",
    "extract_features",
    "list_backbones",
]
__version__ = "0.1.0"
