"""Data: sources of labelled images, the LightningDataModule, and preprocessing fitted on the train split."""

from tlkit.data.datamodule import ImageDataModule
from tlkit.data.preprocess import Normalize, Whitening, build_preprocess
from tlkit.data.sources import list_class_names, load_source

__all__ = ["ImageDataModule", "Normalize", "Whitening", "build_preprocess", "list_class_names", "load_source"]
