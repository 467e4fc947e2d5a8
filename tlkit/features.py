"""Feature extraction: embeddings of any backbone, saved as safetensors with JSON metadata.

>>> feats = extract_features("resnet18", images, pretrained=False)        # (N, 3, H, W) uint8 or [0, 1] float
>>> feats.features.shape, feats.labels.shape
>>> feats.save("feats.safetensors"); FeatureSet.load("feats.safetensors")

Extraction runs through a Lightning ``Trainer.predict`` (precision and devices as in training). Every sample carries
its dataset index, so the rows of the result follow the dataset order on any number of devices: each rank takes a
contiguous block of the dataset, writes shards of at most ``shard_size`` rows, and rank 0 concatenates the shards in
index order into one file, one shard in memory at a time.

A linear probe trains on the result (:class:`tlkit.LinearProbe`, :mod:`tlkit.probe`): extract once, train many.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from tlkit.backbones import TORCHVISION_PREFIX, Backbone, Pretrained, create_backbone
from tlkit.data.datamodule import ImageDataModule
from tlkit.data.preprocess import build_preprocess
from tlkit.data.sources import ImageDataset
from tlkit.freezing import modes_restored
from tlkit.io import atomic_open, atomic_path

if TYPE_CHECKING:
    from tlkit.module import TransferClassifier

POOLS = ("model", "avg", "max", "token", "none")
SPLITS = ("train", "val", "predict", "all")
METADATA_KEY = "tlkit.features"
DEFAULT_KEY = "features"


# --------------------------------------------------------------------------------------------------- FeatureSet


def check_single_label(labels: Tensor, what: str) -> None:
    """Raises a ``ValueError`` for multi-label targets (``(N, C)``), which ``what`` cannot learn from."""
    if labels.ndim == 2:
        raise ValueError(
            f"{what} learns one class per image, but these are features of a multi-label source (labels of shape "
            f"{tuple(labels.shape)}). Fine-tune a TransferClassifier with freeze='backbone' for a multi-label probe."
        )


@dataclass
class FeatureSet:
    """Features of a set of images, with their labels, ids and metadata.

    Attributes:
        layers: features per layer name, each ``(N, ...)``; one entry (``"features"``) unless ``layers=`` was given.
        labels: ``(N,)`` int64 class indices, ``-1`` where the image has no label.
        ids: per row, the image's path, or ``"<split>/<index>"`` for in-memory images.
        metadata: backbone, weights, preprocessing, pool, layer names, and ``splits`` (name -> ``[start, stop)``).
    """

    layers: dict[str, Tensor]
    labels: Tensor
    ids: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {name: len(t) for name, t in self.layers.items()} | {"labels": len(self.labels), "ids": len(self.ids)}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"FeatureSet rows do not line up: {sizes}")

    @property
    def features(self) -> Tensor:
        """The features, when there is one layer (otherwise pick one from ``layers``)."""
        if len(self.layers) != 1:
            raise ValueError(f"This FeatureSet has several layers {list(self.layers)}: use feats.layers[name].")
        return next(iter(self.layers.values()))

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> FeatureSet:
        """The rows of one data split (``"train"``, ``"val"``) of a set extracted from a data module."""
        splits = self.metadata.get("splits", {})
        if name not in splits:
            raise KeyError(f"No split {name!r} in this FeatureSet; it has {sorted(splits)}.")
        start, stop = splits[name]
        meta = {**self.metadata, "splits": {name: [0, stop - start]}}
        layers = {k: v[start:stop] for k, v in self.layers.items()}
        return FeatureSet(layers, self.labels[start:stop], self.ids[start:stop], meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.safetensors`` file (tensors) whose header carries the ids and metadata as JSON; atomic."""
        path = Path(path)
        tensors = {f"layer.{k}": v.contiguous() for k, v in self.layers.items()} | {"labels": self.labels}
        header = {METADATA_KEY: json.dumps({"ids": self.ids, **self.metadata})}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # fsync'd, swapped in whole; a killed writer's leftover goes with the next
            save_file(tensors, tmp, metadata=header)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSet:
        """Read a file written by :meth:`save` or by ``extract_features(out=...)`` (no pickle involved)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No feature file at {path}; write one with extract_features(..., out=path).")
        with safe_open(path, framework="pt") as f:
            header = (f.metadata() or {}).get(METADATA_KEY)
        if header is None:
            raise ValueError(f"{path} is a safetensors file without tlkit feature metadata ({METADATA_KEY!r}).")
        tensors = load_file(path)
        meta = json.loads(header)
        ids = meta.pop("ids")
        layers = {k.removeprefix("layer."): v for k, v in tensors.items() if k.startswith("layer.")}
        layers = {name: layers[name] for name in meta.get("layers", list(layers))}  # keep the extraction order
        return cls(layers, tensors["labels"], ids, meta)


# --------------------------------------------------------------------------------------------------- extraction


class FeatureExtractor(nn.Module):
    """Images (uint8, or float in [0, 1]) → preprocessing → backbone → pooled features per layer.

    Args:
        backbone: a :class:`~tlkit.backbones.Backbone`.
        preprocess: module applied to [0, 1] float images (normalisation or whitening).
        layers: intermediate outputs to return instead of the final features: for timm, module names (its
            ``feature_info`` names, e.g. ``layer2``, ``blocks.3``) or stage indices of ``forward_intermediates``;
            for torchvision, graph node names (see ``torchvision.models.feature_extraction.get_graph_node_names``).
        pool: ``"model"`` (default): pool as the model's own head does, which is exactly what a
            :class:`~tlkit.module.TransferClassifier` on this backbone sees (``Backbone.forward``; for timm
            ``forward_head(forward_features(x), pre_logits=True)`` whatever its pool: ``map`` attention pooling,
            ``avgmax``, a norm or MLP after the pooling); on ``layers``, the model's global pool type if it is
            avg, max or token. ``"avg"``, ``"max"``, ``"token"`` (class token of a ViT): that pooling of the final
            output, which is the model's own head path where it is the model's own pool type. ``"none"`` keeps
            the map or tokens. A pooling the model cannot give (``token`` without a class token, ``avg`` where a
            layer after the head's pooling changes the width) raises an error saying what would work.
    """

    def __init__(
        self,
        backbone: Backbone,
        preprocess: nn.Module | None = None,
        layers: Sequence[str | int] | None = None,
        pool: str = "model",
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"Unknown pool={pool!r}; choose one of {POOLS}.")
        self.backbone = backbone
        self.preprocess = preprocess if preprocess is not None else nn.Identity()
        self.pool = pool
        self.torchvision = backbone.name.startswith(TORCHVISION_PREFIX)
        self.own_pool = _own_pool_type(backbone)
        self.prefix_tokens = _prefix_tokens(backbone)
        self.layers = [str(x) for x in layers] if layers else None
        self._pooling = self._resolve_layer_pool() if self.layers else pool  # what _pool applies
        self._indices = [int(x) for x in layers] if layers and all(_is_int(x) for x in layers) else None
        self._graph = self._build_graph() if self.layers or (self.torchvision and not self.model_path) else None

    @property
    def names(self) -> list[str]:
        """Keys of the returned dict, in order."""
        return self.layers or [DEFAULT_KEY]

    @property
    def model_path(self) -> bool:
        """Final features pooled as the model's own head pools them: the backbone's forward, as in training."""
        return not self.layers and self.pool in ("model", self.own_pool)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        x = images.float().div(255) if images.dtype == torch.uint8 else images
        x = self.preprocess(x)
        with self.backbone.input_size_explained(x):  # every path below, not only the backbone's own forward
            return self._features(x)

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        if self.model_path:  # one code path with the classifier, so features and training inputs cannot drift
            return {DEFAULT_KEY: self.backbone(x)}
        if self._graph is not None and self.torchvision:
            outputs = self._graph(x)
            if self.layers is None:
                return {DEFAULT_KEY: self._final(outputs[DEFAULT_KEY])}
            return {name: self._pool(outputs[name]) for name in self.names}
        if self._indices is not None:
            return {name: self._pool(m) for name, m in zip(self.names, self._intermediates(x), strict=True)}
        if self.layers:
            return self._hooked(x)
        model = self.backbone.model
        channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"  # Swin, MambaOut: (N, H, W, C) maps
        return {DEFAULT_KEY: self._final(model.forward_features(x), channels_last)}

    def _intermediates(self, x: Tensor) -> list[Tensor | tuple[Tensor, Tensor]]:
        """timm's ``forward_intermediates`` at the layer indices: maps with the class token split off, so for
        ``token`` pooling each comes as ``(map, prefix tokens)`` where the model can return those."""
        return self.backbone.model.forward_intermediates(
            x, indices=self._indices, intermediates_only=True, **self._prefix_tokens_kwargs
        )

    @functools.cached_property
    def _prefix_tokens_kwargs(self) -> dict[str, bool]:
        """``return_prefix_tokens=True`` where ``token`` pooling needs them and the model can return them (looked up
        once, not per batch)."""
        params = inspect.signature(self.backbone.model.forward_intermediates).parameters
        return {"return_prefix_tokens": True} if self._pooling == "token" and "return_prefix_tokens" in params else {}

    def _hooked(self, x: Tensor) -> dict[str, Tensor]:
        """Outputs of named timm modules, caught by forward hooks (the tensors ``features_only`` returns)."""
        caught: dict[str, Tensor] = {}
        modules = dict(self.backbone.model.named_modules())
        handles = [
            modules[n].register_forward_hook(lambda _m, _i, out, n=n: caught.__setitem__(n, out)) for n in self.layers
        ]
        try:
            self.backbone.model.forward_features(x)
        finally:
            for handle in handles:
                handle.remove()
        return {name: self._pool(caught[name]) for name in self.names}

    def _final(self, output: Any, channels_last: bool = False) -> Tensor:
        """The final output pooled as asked; refused where that is not the width the model's features have."""
        if not isinstance(output, Tensor):
            raise ValueError(
                f"{self.backbone.name!r} returns {type(output).__name__} from its final layer, not one tensor, so "
                f"pool={self.pool!r} cannot pool it; use pool='model' (its own head's pooling)."
            )
        if self.pool == "none":  # the output as forward_features gives it
            return output
        pooled = self._pool(output.permute(0, 3, 1, 2) if channels_last and output.ndim == 4 else output)
        width = self.backbone.num_features
        if pooled.shape[-1] != width:
            raise ValueError(
                f"pool={self.pool!r} on {self.backbone.name!r} gives {pooled.shape[-1]}-wide features, but the "
                f"model's own head makes {width}-wide ones from its final output (it pools with "
                f"{self.own_pool or 'its own pooling'!r} and may apply a layer after it), and those are what a "
                "classifier on it sees. Use pool='model' for them, or pool='none' / layers=[...] for the raw output."
            )
        return pooled

    def _pool(self, x: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        pool = self._pooling
        if isinstance(x, tuple):  # an intermediate layer as (map, prefix tokens): see _intermediates
            x, prefix = x
            if pool == "token":
                return prefix[:, 0]
        if pool == "none" or x.ndim == 2:
            return x
        if x.ndim == 4:  # (N, C, H, W)
            if pool == "token":
                fix = "'avg', 'max' or 'none' for the layers" if self.layers else "'model', 'avg' or 'max'"
                why = " (pool='model' on layers takes each one's class token)" if self.pool == "model" else ""
                raise ValueError(
                    f"pool='token' needs a transformer's token sequence{why}; {self.backbone.name!r} gives a "
                    f"{tuple(x.shape)} map here. Use pool={fix}."
                )
            return x.mean(dim=(2, 3)) if pool == "avg" else x.amax(dim=(2, 3))
        if x.ndim == 3:  # (N, tokens, C), prefix (class) tokens first, as timm and torchvision ViTs lay them out
            return self._pool_tokens(x, pool)
        raise ValueError(f"Cannot pool an output of shape {tuple(x.shape)}; use pool='none'.")

    def _pool_tokens(self, x: Tensor, pool: str) -> Tensor:
        if self.prefix_tokens is None:  # a class token, but no count of the prefix tokens to split off
            raise ValueError(
                f"{self.backbone.name!r} has a class token but does not say how many prefix tokens lead its "
                f"sequence, so pool={pool!r} cannot tell them from the patch tokens. Use pool='model' or 'none'."
            )
        if pool == "token":
            if self.prefix_tokens == 0:
                raise ValueError(
                    f"pool='token' needs a class token, and {self.backbone.name!r} has none (all its tokens are "
                    f"patches; its own pool is {self.own_pool!r}). Use pool='model', 'avg' or 'max'."
                )
            return x[:, 0]
        patches = x[:, self.prefix_tokens :]
        return patches.mean(dim=1) if pool == "avg" else patches.amax(dim=1)

    def _resolve_layer_pool(self) -> str:
        """On intermediate layers ``model`` means the model's global pool type; a head-only pooling (attention,
        avg+max) has no meaning there, so an explicit choice is asked for rather than guessed."""
        if self.pool != "model":
            return self.pool
        if self.own_pool not in ("avg", "max", "token"):
            raise ValueError(
                f"layers= with pool='model': {self.backbone.name!r} pools with {self.own_pool!r}, which its head "
                "applies to the final output only. Pass pool='avg', 'max', 'token' or 'none' for the layers."
            )
        return self.own_pool

    def _build_graph(self) -> nn.Module | None:
        model = self.backbone.model
        if self.torchvision:
            return _torchvision_graph(model, self.layers or [_torchvision_spatial_node(model)], self)
        if self._indices is None:
            _check_timm_layers(model, self.layers)
        return None


def _own_pool_type(backbone: Backbone) -> str | None:
    """The global pool the model's head applies: timm's pool type; torchvision's ViT takes its class token, the
    other torchvision classifiers average their final map."""
    if backbone.name.startswith(TORCHVISION_PREFIX):
        return "token" if hasattr(backbone.model, "class_token") else "avg"
    return _timm_pool_type(backbone.model)


def _prefix_tokens(backbone: Backbone) -> int | None:
    """How many class/register tokens lead the token sequence: timm says (``num_prefix_tokens``), torchvision's
    ViT has one class token. ``None``: the model has a class token but no count (PiT, VOLO, CoaT, CrossViT)."""
    model = backbone.model
    if backbone.name.startswith(TORCHVISION_PREFIX):
        return 1
    count = getattr(model, "num_prefix_tokens", None)
    if count is not None:
        return count
    return None if hasattr(model, "cls_token") else 0


def _timm_pool_type(model: nn.Module) -> str | None:
    """The global pool a timm model applies in ``forward_head`` (``avg``, ``max``, ``token``, ``map``...), if it says.

    timm keeps it as ``global_pool`` (a string or a ``SelectAdaptivePool2d``) on the model or on its head module
    (ConvNeXt), or as ``pool_type`` on the head (Hiera's ``NormClassifierHead``). ``fastavg`` is ``avg``.
    """
    head = getattr(model, "head", None)
    for owner, attr in ((model, "global_pool"), (head, "global_pool"), (head, "pool_type")):
        pool = getattr(owner, attr, None)
        pool = pool if isinstance(pool, str) else getattr(pool, "pool_type", None)
        if pool:
            return pool.removeprefix("fast")
    return None


def _is_int(x: str | int) -> bool:
    return isinstance(x, int) or (isinstance(x, str) and x.lstrip("-").isdigit())


def _check_timm_layers(model: nn.Module, layers: list[str]) -> None:
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        stages = [info["module"] for info in getattr(model, "feature_info", [])]
        raise ValueError(
            f"Unknown layers {missing} for {type(model).__name__}. Stage outputs (timm feature_info): {stages}; "
            f"any module name of model.named_modules() works, or stage indices (forward_intermediates)."
        )


def _torchvision_graph(model: nn.Module, nodes: list[str], extractor: FeatureExtractor) -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    valid = get_graph_node_names(model)[1]
    missing = [n for n in nodes if not any(v == n or v.startswith(f"{n}.") for v in valid)]  # modules name nodes too
    if missing:
        raise ValueError(f"Unknown layers {missing}. Valid graph nodes (get_graph_node_names): {valid}")
    if extractor.layers is None:  # a pool other than the model's own, on the final map: under the default key
        return create_feature_extractor(model, return_nodes={nodes[0]: DEFAULT_KEY})
    return create_feature_extractor(model, return_nodes={n: n for n in nodes})


def _torchvision_spatial_node(model: nn.Module) -> str:
    """The graph node that feeds a torchvision model's global average pool (its final feature map)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    nodes = get_graph_node_names(model)[1]
    pools = [i for i, n in enumerate(nodes) if "avgpool" in n or "adaptive_avg_pool" in n]
    if not pools or pools[0] == 0:
        raise ValueError(
            f"Cannot find the global average pool of {type(model).__name__}; use pool='model' (its own pooling), "
            f"or pass layers=[node] with pool=... "
            f"(graph nodes: {nodes})"
        )
    return nodes[pools[0] - 1]


class _Indexed(Dataset):
    """``(image, label, dataset index)`` for a block ``[start, stop)`` of ``dataset``."""

    def __init__(self, dataset: Dataset, start: int, stop: int):
        self.dataset, self.start, self.stop = dataset, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        item = self.dataset[self.start + i]
        image, label = item if isinstance(item, tuple | list) and len(item) == 2 else (item, -1)
        return image, torch.as_tensor(label), self.start + i  # a class index, or a multi-label row


class _FeatureModule(L.LightningModule):
    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor

    @property
    def data_config(self) -> dict[str, Any]:
        return self.extractor.backbone.data_config

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        images, labels, index = batch
        features = {k: v.float() for k, v in self.extractor(images).items()}
        return {"features": features, "labels": labels, "index": index}


class _ExtractData(L.LightningDataModule):
    """The rank's contiguous block of the dataset, so that rank order is dataset order."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int):
        super().__init__()
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        start, stop = _block(len(self.dataset), rank, world)
        return DataLoader(
            _Indexed(self.dataset, start, stop),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )


def _block(n: int, rank: int, world: int) -> tuple[int, int]:
    per = math.ceil(n / world)
    return min(rank * per, n), min((rank + 1) * per, n)


class ShardWriter(BasePredictionWriter):
    """Collects predicted features in order; with ``parts`` set, flushes them to shard files of ``shard_size`` rows
    so memory stays flat, each shard named by rank and carrying the dataset index of every row."""

    def __init__(self, parts: Path | None, shard_size: int, ids: list[str]):
        super().__init__(write_interval="batch")
        self.parts, self.shard_size, self.ids = parts, shard_size, ids
        self.buffer: list[dict[str, Any]] = []
        self.buffered = 0
        self.peak_rows = 0  # largest number of rows held in memory at once (tests check it stays bounded)
        self.shards: list[Path] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        item = {
            "features": {k: v.cpu() for k, v in prediction["features"].items()},
            "labels": prediction["labels"].cpu(),
            "index": prediction["index"].cpu(),
        }
        self.buffer.append(item)
        self.buffered += len(item["labels"])
        self.peak_rows = max(self.peak_rows, self.buffered)
        if self.parts is not None and self.buffered >= self.shard_size:
            self.flush(trainer.global_rank)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.parts is not None:
            self.flush(trainer.global_rank)

    def collected(self) -> dict[str, Any]:
        """Everything in the buffer, concatenated (in-memory extraction)."""
        return _concat(self.buffer)

    def flush(self, rank: int) -> None:
        if not self.buffer:
            return
        rows = _concat(self.buffer)
        tensors = {f"layer.{k}": v.contiguous() for k, v in rows["features"].items()}
        tensors |= {"labels": rows["labels"], "index": rows["index"]}
        ids = [self.ids[i] for i in rows["index"].tolist()]
        path = self.parts / f"rank{rank:03d}-{len(self.shards):06d}.safetensors"
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"ids": json.dumps(ids)})
        self.shards.append(path)
        self.buffer, self.buffered = [], 0


def _concat(items: list[dict[str, Any]]) -> dict[str, Any]:
    names = list(items[0]["features"]) if items else []
    return {
        "features": {n: torch.cat([it["features"][n] for it in items]) for n in names},
        "labels": torch.cat([it["labels"] for it in items]) if items else torch.empty(0, dtype=torch.int64),
        "index": torch.cat([it["index"] for it in items]) if items else torch.empty(0, dtype=torch.int64),
    }


def merge_shards(shards: Sequence[str | os.PathLike], out: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Concatenate shard files (any order, any ranks) into one safetensors file ordered by dataset index.

    The shards must cover the indices ``0..N-1`` exactly once. Only one shard tensor is in memory at a time: the
    header is computed from the shard headers, then each tensor's bytes are streamed in; the file appears atomically.
    """
    heads = [_shard_head(Path(s)) for s in shards]
    heads.sort(key=lambda h: h["first"])
    expected = 0
    for head in heads:
        if head["first"] != expected or not head["contiguous"]:
            raise ValueError(f"Shards do not cover the dataset indices in order: {head['path']} starts at "
                             f"{head['first']}, expected {expected} (is a rank's output missing?)")  # fmt: skip
        expected += head["rows"]
    keys = list(heads[0]["shapes"]) if heads else []
    ids = [i for head in heads for i in head["ids"]]
    layers = [k.removeprefix("layer.") for k in keys if k.startswith("layer.")]
    meta = {"ids": ids, **metadata, "layers": layers}
    specs = []
    for key in [k for k in keys if k != "index"]:
        dtype, shape = heads[0]["dtypes"][key], heads[0]["shapes"][key]
        specs.append((key, dtype, [expected, *shape[1:]], _tensor_chunks(heads, key)))
    return _write_streaming(Path(out), specs, {METADATA_KEY: json.dumps(meta)})


def _shard_head(path: Path) -> dict[str, Any]:
    with safe_open(path, framework="pt") as f:
        index = f.get_tensor("index")
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        ids = json.loads(f.metadata()["ids"])
    contiguous = (
        bool(torch.equal(index, torch.arange(int(index[0]), int(index[0]) + len(index)))) if len(index) else True
    )
    first = int(index[0]) if len(index) else 0
    return dict(path=path, first=first, rows=len(index), contiguous=contiguous, shapes=shapes, dtypes=dtypes, ids=ids)


def _tensor_chunks(heads: list[dict[str, Any]], key: str) -> Iterator[Tensor]:
    def chunks() -> Iterator[Tensor]:
        for head in heads:
            with safe_open(head["path"], framework="pt") as f:
                yield f.get_tensor(key)

    return chunks


def _write_streaming(path: Path, specs: list[tuple], metadata: dict[str, str]) -> Path:
    """Write a safetensors file tensor by tensor from chunk iterators (the format: u64 header size, JSON header,
    raw little-endian bytes), so that the whole content never has to be in memory."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape, _ in specs:
        nbytes = math.prod(shape) * _itemsize(dtype)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    with atomic_open(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, _, _, chunks in specs:
            for chunk in chunks():
                f.write(chunk.contiguous().view(torch.uint8).numpy().tobytes())
    return path


def _itemsize(code: str) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "F64": 8, "I32": 4}[code]


def extract_features(
    model: str | os.PathLike | Backbone | TransferClassifier,
    data: ImageDataModule | DataLoader | str | os.PathLike | Tensor,
    layers: Sequence[str | int] | None = None,
    pool: str = "model",
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "32-true",
    out: str | os.PathLike | None = None,
    *,
    pretrained: Pretrained = True,
    split: str = "all",
    preprocess: str | nn.Module = "auto",
    devices: int = 1,
    strategy: str = "auto",
    num_workers: int | None = None,
    shard_size: int = 4096,
    progress: bool = False,
) -> FeatureSet | None:
    """Extract features of ``data`` with ``model``'s backbone, in dataset order, labels aligned.

    Args:
        model: a backbone name (``resnet50``, ``torchvision/resnet50``), a :class:`~tlkit.backbones.Backbone`, a
            :class:`~tlkit.module.TransferClassifier` or the path of one of its checkpoints (``.ckpt``).
        data: an :class:`~tlkit.data.ImageDataModule` (its evaluation transform and fitted preprocessing), a
            DataLoader of images or ``(images, labels)``, a folder of class sub-folders, or a tensor of images
            ``(N, 3, H, W)``, uint8 or float in [0, 1].
        layers: intermediate outputs instead of the final features (see :class:`FeatureExtractor`).
        pool: ``"model"`` (default: pooled as the model's own head pools, the features a classifier on this
            backbone trains on), ``"avg"``, ``"max"``, ``"token"`` or ``"none"`` (see :class:`FeatureExtractor`).
        batch_size: images per batch (default: the data module's, else 64).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        precision: Lightning precision (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``); features are stored float32.
        out: stream the result into this ``.safetensors`` file (shards of ``shard_size`` rows, then one ordered file);
            ``None`` keeps it in memory and returns it.
        pretrained: weights when ``model`` is a name (see :func:`~tlkit.backbones.create_backbone`).
        split: for a data module: ``"train"``, ``"val"``, ``"predict"`` or ``"all"`` (train then val).
        preprocess: ``"auto"`` (the data module's, else the checkpoint's, else the backbone's mean/std), ``"none"``
            (the inputs are already normalised) or a module applied to [0, 1] images.
        devices: number of devices; more than one shards the data across ranks (needs ``out``).
        strategy: Lightning strategy for several devices (default DDP).
        num_workers: loader workers (default: the data module's, else 0).
        shard_size: rows per shard file when streaming to ``out``.
        progress: show a progress bar.

    Returns:
        The :class:`FeatureSet` (also when streamed to ``out``, reloaded from it on rank 0); ``None`` on other ranks.

    Example:
        >>> dm = ImageDataModule("textures", image_size=64)
        >>> feats = extract_features("tf_efficientnet_lite0", dm, pretrained="packaged")
        >>> feats.split("train").features.shape
        torch.Size([480, 1280])
    """
    backbone, meta, ckpt_preprocess = _resolve_model(model, pretrained)
    data = _folder_data_module(data)
    data = _for_backbone(data, backbone)
    dataset, ids, splits, data_pre, loader_opts = _resolve_data(data, split)
    prep = _resolve_preprocess(preprocess, data_pre, ckpt_preprocess, backbone)
    extractor = FeatureExtractor(backbone, prep, layers=layers, pool=pool)
    batch_size = batch_size or loader_opts.get("batch_size", 64)
    workers = loader_opts.get("num_workers", 0) if num_workers is None else num_workers
    meta |= dict(pool=pool, layers=extractor.names, splits=splits, preprocess=_describe(prep))
    if devices > 1 and out is None:
        raise ValueError(f"devices={devices} writes through a file: pass out='feats.safetensors'.")
    out = Path(out) if out is not None else None
    parts = out.with_name(f".{out.name}.parts") if out is not None else None
    writer = ShardWriter(parts, shard_size, ids)
    trainer = _trainer(device, devices, strategy, precision, writer, progress)
    if parts is not None and trainer.is_global_zero:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
    trainer.strategy.barrier()
    with modes_restored(backbone):  # a model passed in mid-training gets its modes back
        extractor.eval()
        trainer.predict(_FeatureModule(extractor), datamodule=_ExtractData(dataset, batch_size, workers),
                        return_predictions=False)  # fmt: skip
    return _finish(trainer, writer, out, parts, ids, meta)


def _finish(trainer, writer: ShardWriter, out: Path | None, parts: Path | None, ids, meta) -> FeatureSet | None:
    if out is None:
        rows = writer.collected()
        labels = rows["labels"]
        return FeatureSet(rows["features"] or {n: torch.empty(0) for n in meta["layers"]}, labels, ids, meta)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    merge_shards(sorted(parts.glob("rank*.safetensors")), out, meta)
    shutil.rmtree(parts, ignore_errors=True)
    return FeatureSet.load(out)


def _trainer(device: str, devices: int, strategy: str, precision: str, writer: ShardWriter, progress: bool):
    accelerator, _, index = device.partition(":")
    if accelerator == "cuda":
        accelerator = "gpu"
    chosen: int | list[int] = [int(index)] if index else devices
    if devices > 1 and strategy == "auto":
        strategy = "ddp"
    with _quiet(not progress):
        return L.Trainer(
            accelerator=accelerator,
            devices=chosen,
            strategy=strategy,
            precision=precision,
            callbacks=[writer],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            use_distributed_sampler=False,  # each rank reads its own contiguous block (see _ExtractData)
        )


@contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence the Trainer's start-up banner (GPU/TPU available, tips) for a library call."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    if enabled:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _resolve_model(model: Any, pretrained: Pretrained) -> tuple[Backbone, dict[str, Any], nn.Module | None]:
    from tlkit.module import TransferClassifier

    if isinstance(model, str | os.PathLike) and (Path(model).suffix == ".ckpt" or Path(model).is_file()):
        from tlkit.export import load_checkpoint

        classifier, preprocess, _ = load_checkpoint(model)
        return classifier.backbone, _meta(classifier.backbone, f"checkpoint:{model}"), preprocess
    if isinstance(model, str):
        return create_backbone(model, pretrained=pretrained), _meta(model, pretrained), None
    if isinstance(model, TransferClassifier):
        return model.backbone, _meta(model.backbone, model.hparams.pretrained), None
    if isinstance(model, Backbone):
        return model, _meta(model, "given"), None
    raise TypeError(
        f"model must be a backbone name, a Backbone, a TransferClassifier or a checkpoint path, not {type(model)}."
    )


def _meta(backbone: Backbone | str, weights: Any) -> dict[str, Any]:
    name = backbone if isinstance(backbone, str) else backbone.name
    return {"backbone": name, "weights": str(weights)}


def _for_backbone(data: Any, backbone: Backbone) -> Any:
    """A data module built without ``data_config`` prepares images for the backbone it feeds here: a copy of it
    with the backbone's (its own arguments, such as ``image_size``, still override it)."""
    if not isinstance(data, ImageDataModule) or data.hparams.data_config is not None:
        return data
    copy = type(data)(**{**data.hparams, "data_config": backbone.data_config})
    copy.load_state_dict(data.state_dict())  # fitted statistics (if any) carry over
    return copy


def _folder_data_module(data: Any) -> Any:
    """A folder of class sub-folders becomes a data module (its train and val splits, evaluation transform)."""
    if not isinstance(data, str | os.PathLike):
        return data
    path = Path(str(data).removeprefix("folder:"))
    if not path.is_dir():
        raise FileNotFoundError(f"data={str(data)!r} is not a folder; pass a folder, a tensor, a loader or a dm.")
    return ImageDataModule(source=f"folder:{path}")


def _resolve_data(data: Any, split: str) -> tuple[Dataset, list[str], dict, nn.Module | None, dict]:
    if isinstance(data, ImageDataModule):
        return _from_data_module(data, split)
    if isinstance(data, Tensor):
        if data.ndim != 4:
            raise ValueError(f"A tensor of images must be (N, 3, H, W); got shape {tuple(data.shape)}.")
        ids = [str(i) for i in range(len(data))]
        return TensorDataset(data, torch.full((len(data),), -1)), ids, {}, None, {}
    if isinstance(data, DataLoader):
        ids = [str(i) for i in range(len(data.dataset))]
        opts = {"batch_size": data.batch_size or 64, "num_workers": data.num_workers}
        return data.dataset, ids, {}, None, opts
    raise TypeError(f"data must be an ImageDataModule, a DataLoader, a folder or a tensor, not {type(data)}.")


def _from_data_module(dm: ImageDataModule, split: str) -> tuple[Dataset, list[str], dict, nn.Module | None, dict]:
    if split not in SPLITS:
        raise ValueError(f"Unknown split={split!r}; choose one of {SPLITS}.")
    dm.fit_preprocess()  # fitted statistics (dataset mean/std, whitening) come from the train split
    names = ["train", "val"] if split == "all" else [split]
    parts = {"train": lambda: dm.data.train, "val": lambda: dm.data.val, "predict": dm.predict_split}
    datasets, ids, ranges, start = [], [], {}, 0
    for name in names:
        part = parts[name]()
        limits = dict(max_pixels=dm.hparams.max_image_pixels, on_bad_image=dm.hparams.on_bad_image)
        datasets.append(ImageDataset(part, dm.transform(train=False), **limits))
        ids += [s if isinstance(s, str) else f"{name}/{i}" for i, s in enumerate(part.samples)]
        ranges[name] = [start, start + len(part)]
        start += len(part)
    opts = {"batch_size": dm.hparams.batch_size, "num_workers": dm.hparams.num_workers}
    return ConcatDataset(datasets), ids, ranges, dm.preprocess, opts


def _resolve_preprocess(choice: str | nn.Module, from_data, from_ckpt, backbone: Backbone) -> nn.Module:
    if isinstance(choice, nn.Module):
        return choice
    if choice == "none":
        return nn.Identity()
    if choice != "auto":
        raise ValueError(f"preprocess must be 'auto', 'none' or an nn.Module, not {choice!r}.")
    if from_data is not None:
        return from_data
    if from_ckpt is not None:
        return from_ckpt
    config = backbone.data_config
    return build_preprocess("pretrained", mean=config["mean"], std=config["std"])


def _describe(module: nn.Module) -> dict[str, Any]:
    state = {k: v.flatten().tolist()[:16] for k, v in module.state_dict().items() if v.numel() <= 16}
    return {"module": type(module).__name__, "state": state}
