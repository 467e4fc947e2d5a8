"""Fitted input preprocessing applied on the device after the batch transfer.

Every module takes a float tensor in [0, 1] of shape (N, C, H, W), or a uint8 one (scaled by 1/255, as ``fit`` does;
the data module passes uint8 batches straight in, so ``Normalize`` folds the scaling into its affine pass). Modules keep
their statistics in registered buffers, so they travel with state_dicts and checkpoints and a freshly built module
restores them without refitting. Buffer shapes are fixed at construction for the same reason, which is why image-scope
whitening takes the image size up front.

Statistics are fitted on the train split only, in one streaming pass that accumulates float64 running sums
(count, sum x, sum x x^T); the dataset is never concatenated in memory.

Distributed fitting: when ``torch.distributed`` is initialised, ``fit`` is a collective call. Each rank streams its
own shard of the train split and the sums and counts are all-reduced (SUM) before the statistics are computed, so every
rank ends up with identical buffers. If every rank streams the *full* train split instead, the result is still
identical across ranks and equal to a single-process fit (every sum is scaled by the world size, which cancels), the
work is just not deduplicated.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_EPS",
    "MAX_IMAGE_DIM",
    "PREPROCESS",
    "Identity",
    "Normalize",
    "Whitening",
    "build_preprocess",
    "needs_fit",
    "render_preprocess_grid",
]

PREPROCESS = ("none", "pretrained", "dataset", "pca", "zca")

# Image-scope whitening stores a D x D matrix and eigendecomposes a D x D covariance; CIFAR-sized RGB (3x32x32 = 3072)
# is the largest D for which that stays cheap (a 36 MiB float32 matrix, a float64 eigh of a few CPU seconds).
MAX_IMAGE_DIM = 3 * 32 * 32

# eps is absolute and added to the covariance eigenvalues of [0, 1]-scaled data; it depends on the scope because the
# spectra differ by orders of magnitude:
# - channel: the smallest colour-direction variance of natural photos is ~2e-4..2e-3, while 8-bit quantisation noise
#   has variance (1/255)^2/12 ~ 1.3e-6. 1e-5 whitens every real colour direction (output variance > 0.95) and still
#   bounds the gain at ~316x for a degenerate (e.g. grey-as-RGB) dataset.
# - image: the patch spectrum decays like 1/f^2 down to the noise floor (~1e-5 on 8x8 photo patches), so a tiny eps
#   would blow high-frequency noise up to unit variance. 1e-2 (~1/6 of a typical per-pixel variance of 0.06) keeps the
#   strong low/mid-frequency components white and softly damps the noisy tail (gain at most 10x).
DEFAULT_EPS: dict[str, float] = {"channel": 1e-5, "image": 1e-2}

# Largest number of elements converted to float64 at once while streaming, to bound the temporary copy (32 MiB).
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------- streaming sums


def _as_batch(batch: Tensor | Sequence[Tensor]) -> Tensor:
    """Returns the image tensor of a batch, taking the first element of ``(x, y, ...)`` tuples."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(f"expected a Tensor batch or an (x, y) tuple, got {type(batch).__name__}")
    if batch.dim() != 4:
        raise ValueError(f"expected batches of shape (N, C, H, W), got {tuple(batch.shape)}")
    if batch.dtype != torch.uint8 and not batch.is_floating_point():
        raise TypeError(f"expected float images in [0, 1] (or uint8), got dtype {batch.dtype}")
    return batch


def _float64_chunks(batch: Tensor) -> Iterable[Tensor]:
    """Yields float64 slices of ``batch`` in [0, 1]; uint8 is scaled by 1/255 like the data module does."""
    # MPS has no float64; everything else accumulates on the batch's own device (fast on GPU).
    if batch.device.type == "mps":
        batch = batch.cpu()
    per_image = max(1, batch[0].numel())
    for part in batch.split(max(1, _CHUNK_ELEMENTS // per_image)):
        part = part.double()
        yield part / 255.0 if batch.dtype == torch.uint8 else part


def _channel_rows(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, C): every pixel is one sample of the colour distribution."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _image_rows(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C*H*W): every image is one sample."""
    return x.reshape(x.shape[0], -1)


def _all_reduce_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Sums float64 tensors over all ranks, in place, when torch.distributed is initialised; returns CPU tensors.

    Each tensor is reduced on its own (no concatenated copy), so a D x D sum is never duplicated in memory.
    """
    tensors = [t.cpu() for t in tensors]
    if not (dist.is_available() and dist.is_initialized()):
        return tensors
    # gloo reduces CPU tensors; NCCL only reduces CUDA tensors.
    nccl = dist.get_backend() == "nccl"
    for t in tensors:
        if nccl:
            on_device = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            t.copy_(on_device)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return tensors


class _Moments:
    """Float64 running count, sum x and sum x x^T (or sum x^2 when ``full`` is False) of (M, D) rows."""

    def __init__(self, dim: int, full: bool) -> None:
        self.full = full
        self.count = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.second = torch.zeros((dim, dim) if full else (dim,), dtype=torch.float64)

    def add(self, rows: Tensor) -> None:
        """Accumulates a (M, D) float64 block of samples (in place: no D x D temporary)."""
        if rows.device != self.total.device:
            self.count, self.total, self.second = (t.to(rows.device) for t in (self.count, self.total, self.second))
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        if self.full:
            self.second.addmm_(rows.T, rows)
        else:
            self.second += (rows * rows).sum(0)

    def finalize(self) -> tuple[Tensor, Tensor]:
        """Returns (mean, covariance or per-dim variance) over all ranks, population-normalised (divide by n).

        The covariance is computed in place in the D x D sum (which is no longer usable afterwards).
        """
        count, total, second = _all_reduce_sum([self.count, self.total, self.second])
        self.second = second
        if count.item() < 2:
            raise ValueError(f"fit needs at least 2 samples, got {int(count.item())} (was the iterable empty?)")
        mean = total / count
        if not self.full:
            return mean, (second / count - mean * mean).clamp_min(0.0)
        return mean, second.div_(count).addr_(mean, mean, alpha=-1.0)


def _stream(
    batches: Iterable[Tensor],
    moments: _Moments,
    to_rows: Callable[[Tensor], Tensor],
    check: Callable[[Tensor], None],
) -> None:
    """Feeds every batch of ``batches`` through ``check`` and ``to_rows`` into ``moments``."""
    for batch in batches:
        batch = _as_batch(batch)
        check(batch)
        for chunk in _float64_chunks(batch):
            moments.add(to_rows(chunk))


# --------------------------------------------------------------------------------------------------------- modules


def _unit_float(x: Tensor) -> Tensor:
    """uint8 -> float32 / 255; float input is returned as is."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


class _Fitted(nn.Module):
    """Base for modules with fitted buffers: a persistent ``fitted`` flag plus a Python mirror used by ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fitted", torch.tensor(False))
        # forward checks a plain Python bool, not the buffer, so tracing/export sees no data-dependent branch.
        self._is_fitted = False

    @property
    def is_fitted(self) -> bool:
        """Whether statistics are available (fitted, given, or restored from a state_dict)."""
        return self._is_fitted

    def _mark_fitted(self) -> None:
        self.fitted.fill_(True)
        self._is_fitted = True

    def _load_from_state_dict(self, state_dict: Mapping[str, Tensor], prefix: str, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_fitted = bool(self.fitted)

    def _check_fitted(self) -> None:
        if not self._is_fitted:
            raise RuntimeError(
                "preprocessing module is not fitted: call .fit(train_batches) or load a fitted state_dict first"
            )


class Identity(nn.Identity):
    """The ``"none"`` preprocessing: returns its input (uint8 as float / 255); ``fit`` is a no-op so callers can treat
    all kinds alike."""

    is_fitted = True

    def forward(self, x: Tensor) -> Tensor:
        return _unit_float(x)

    def fit(self, batches: Iterable[Tensor]) -> Identity:
        """Does nothing (and does not consume ``batches``)."""
        return self


class Normalize(_Fitted):
    """Per-channel ``(x - mean) / std``, with given (pretrained) statistics or statistics fitted on the train split.

    Args:
        mean: Per-channel mean; with ``std`` the module is fitted at construction. Omit both to ``fit`` later.
        std: Per-channel standard deviation (must be > 0).
        num_channels: Number of channels C; must match ``len(mean)`` when given.
    """

    def __init__(
        self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None, num_channels: int = 3
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.register_buffer("mean", torch.zeros(num_channels))
        self.register_buffer("std", torch.ones(num_channels))
        if (mean is None) != (std is None):
            raise ValueError("Normalize needs both mean and std, or neither (then call fit on the train split)")
        if mean is not None:
            self._set_given(mean, std)

    def _set_given(self, mean: Sequence[float], std: Sequence[float]) -> None:
        mean_t, std_t = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean_t.shape != (self.num_channels,) or std_t.shape != (self.num_channels,):
            raise ValueError(
                f"mean and std need {self.num_channels} values (num_channels), got {len(mean)} and {len(std)}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be > 0, got {list(std)}")
        self.mean.copy_(mean_t)
        self.std.copy_(std_t)
        self._mark_fitted()

    @torch.no_grad()
    def fit(self, batches: Iterable[Tensor]) -> Normalize:
        """Fits per-channel mean/std over all pixels of ``batches`` (float [0, 1] or uint8; ``(x, y)`` tuples ok).

        A (numerically) constant channel gets std 1 so it maps to 0 instead of dividing by ~0.
        """
        moments = _Moments(self.num_channels, full=False)
        _stream(batches, moments, _channel_rows, self._check_batch)
        mean, var = moments.finalize()
        std = var.sqrt()
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.mean.copy_(mean)
        self.std.copy_(std)
        self._mark_fitted()
        return self

    def _check_batch(self, x: Tensor) -> None:
        if x.shape[1] != self.num_channels:
            raise ValueError(f"Normalize expects {self.num_channels} channels, got a batch of {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """Normalises a (N, C, H, W) batch: float in [0, 1], or uint8 (returned as float32)."""
        self._check_fitted()
        if x.dtype == torch.uint8:
            # (x / 255 - mean) / std as one scale and one shift, in place on the only new tensor: on a CPU "device"
            # this is most of the main process's work per batch.
            scale = (1.0 / (255.0 * self.std)).view(1, -1, 1, 1)
            return x.float().mul_(scale).add_((-self.mean / self.std).view(1, -1, 1, 1))
        mean = self.mean.to(x.dtype).view(1, -1, 1, 1)
        std = self.std.to(x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}"


def _image_shape(num_channels: int, image_size: int | Sequence[int] | None) -> tuple[int, int, int]:
    """Validates ``image_size`` for image-scope whitening and returns (C, H, W)."""
    if image_size is None:
        raise ValueError('scope="image" needs image_size (the H, W the module will see); or use scope="channel"')
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    dim = num_channels * h * w
    if dim > MAX_IMAGE_DIM:
        raise ValueError(
            f'scope="image" whitening of {num_channels}x{h}x{w} images needs a {dim}x{dim} covariance, but '
            f'D = C*H*W = {dim} exceeds MAX_IMAGE_DIM = {MAX_IMAGE_DIM} (3x32x32). Use scope="channel" '
            f"(3x3 colour whitening at any resolution) or a smaller image_size (at most {MAX_IMAGE_DIM} values)."
        )
    return num_channels, h, w


def _eigh_in_place(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending, >= 0) and eigenvectors of a symmetric float64 CPU matrix; ``cov`` is destroyed.

    LAPACK's MRRR driver (``syevr``, through SciPy) needs O(D) workspace, so the peak is the covariance plus the
    eigenvector matrix. ``torch.linalg.eigh`` (``syevd``) copies its input and adds a 2 D^2 workspace: twice that.
    Only the lower triangle is read, so rounding asymmetry in ``cov`` does not matter.
    """
    from scipy.linalg import eigh

    # cov is symmetric: its transpose is the same matrix in the Fortran order LAPACK works in, so nothing is copied.
    evals, evecs = eigh(cov.numpy().T, overwrite_a=True, driver="evr", check_finite=False)
    return torch.from_numpy(evals).clamp_min_(0.0), torch.from_numpy(evecs)


def _write_whitening_matrix(out: Tensor, kind: str, evals: Tensor, evecs: Tensor, eps: float) -> None:
    """Writes PCA ``diag(s) U^T`` (rows in descending-eigenvalue order) or ZCA ``U diag(s) U^T`` into ``out``.

    ``s = 1/sqrt(lambda + eps)``; ``evals`` ascending, as LAPACK returns them. ``evecs`` is scaled in place and the
    product is formed in row blocks straight into ``out``, so no further D x D float64 matrix is allocated.
    """
    dim = evals.numel()
    scale = (evals + eps).rsqrt()
    block = max(1, _CHUNK_ELEMENTS // (8 * max(dim, 1)))
    if kind == "pca":
        # eigh's signs are arbitrary: make each vector's largest-magnitude entry positive (reproducible outputs).
        signs = torch.where(evecs.amax(0) >= -evecs.amin(0), 1.0, -1.0).to(evecs.dtype)
        evecs.mul_(scale * signs)
        descending = torch.arange(dim - 1, -1, -1)
        for start in range(0, dim, block):
            out[start : start + block].copy_(evecs[:, descending[start : start + block]].T)
        return
    evecs.mul_(scale.sqrt())  # U diag(sqrt s): ZCA = (U diag(sqrt s)) (U diag(sqrt s))^T, signs cancel
    for start in range(0, dim, block):
        out[start : start + block].copy_(evecs[start : start + block] @ evecs.T)
    symmetric = out + out.T  # exactly symmetric, not just up to rounding (a float32 temporary, half of evecs)
    out.copy_(symmetric.mul_(0.5))


class Whitening(_Fitted):
    """PCA or ZCA whitening fitted on the train split: ``x' = W (x - mu)``.

    With eigendecomposition ``Cov = U diag(lambda) U^T`` (eigenvalues descending) and ``s = 1/sqrt(lambda + eps)``:

    - PCA: ``W = diag(s) U^T``. Output dimension i is the i-th principal component (variance order), scaled to unit
      variance. At image scope the output is reshaped back to (N, C, H, W), but its "channels/pixels" are then
      components in decreasing-variance order, not pixels.
    - ZCA: ``W = U diag(s) U^T`` (symmetric). Of all whitening transforms it gives the output closest to the input,
      so images still look like (edge-enhanced) images.

    ``eps`` is added to the eigenvalues: larger eps = softer whitening, which avoids amplifying noise in tiny-variance
    directions (output variance along eigen-direction i is ``lambda_i / (lambda_i + eps)``).

    Args:
        kind: ``"pca"`` or ``"zca"``.
        scope: ``"channel"`` decorrelates colour with the C x C covariance of pixels (any resolution);
            ``"image"`` whitens the flattened C*H*W image (classic CIFAR preprocessing; D <= ``MAX_IMAGE_DIM``).
        eps: Regulariser added to the eigenvalues; ``None`` uses ``DEFAULT_EPS[scope]``.
        num_channels: Number of channels C.
        image_size: H (square) or (H, W); required for ``scope="image"``, ignored for ``"channel"``.

    Buffers: ``mean`` (D,), ``matrix`` (D, D), ``eigenvalues`` (D,) descending, ``fitted``; D = C or C*H*W.
    """

    def __init__(
        self,
        kind: str,
        scope: str = "channel",
        eps: float | None = None,
        num_channels: int = 3,
        image_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("pca", "zca"):
            raise ValueError(f'Whitening kind must be "pca" or "zca", got {kind!r}')
        if scope not in ("channel", "image"):
            raise ValueError(f'Whitening scope must be "channel" or "image", got {scope!r}')
        self.kind, self.scope = kind, scope
        self.eps = DEFAULT_EPS[scope] if eps is None else float(eps)
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.num_channels = num_channels
        self.image_shape = _image_shape(num_channels, image_size) if scope == "image" else None
        dim = num_channels if scope == "channel" else num_channels * self.image_shape[1] * self.image_shape[2]
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(dim))
        self.register_buffer("eigenvalues", torch.zeros(dim))

    @torch.no_grad()
    def fit(self, batches: Iterable[Tensor]) -> Whitening:
        """Fits mean and whitening matrix from ``batches`` (float [0, 1] or uint8; ``(x, y)`` tuples ok)."""
        moments = _Moments(self.mean.numel(), full=True)
        rows = _channel_rows if self.scope == "channel" else _image_rows
        _stream(batches, moments, rows, self._check_batch)
        mean, cov = moments.finalize()
        del moments  # the eigendecomposition overwrites cov, so nothing else may still use it
        evals, evecs = _eigh_in_place(cov)
        del cov
        self.mean.copy_(mean)
        self.eigenvalues.copy_(evals.flip(0))
        _write_whitening_matrix(self.matrix, self.kind, evals, evecs, self.eps)
        self._mark_fitted()
        return self

    def _check_batch(self, x: Tensor) -> None:
        expected = self.image_shape or (self.num_channels,)
        if tuple(x.shape[1 : 1 + len(expected)]) != expected:
            want = ", ".join(map(str, expected)) + (", H, W" if self.image_shape is None else "")
            raise ValueError(f"{self.scope}-scope Whitening expects batches of (N, {want}), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """Whitens a (N, C, H, W) batch (float in [0, 1] or uint8); the output has the input's shape."""
        self._check_fitted()
        x = _unit_float(x)
        mean, matrix = self.mean.to(x.dtype), self.matrix.to(x.dtype)
        # Centre before multiplying: W x - W mu would cancel catastrophically in float32 when W has large entries.
        if self.scope == "channel":
            return F.conv2d(x - mean.view(1, -1, 1, 1), matrix[:, :, None, None])
        return F.linear(x.flatten(1) - mean, matrix).view(x.shape)

    def extra_repr(self) -> str:
        size = "" if self.image_shape is None else f", image_shape={self.image_shape}"
        return f"kind={self.kind!r}, scope={self.scope!r}, eps={self.eps:g}, num_channels={self.num_channels}{size}"


# --------------------------------------------------------------------------------------------------------- factory


def build_preprocess(
    kind: str,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scope: str = "channel",
    eps: float | None = None,
    image_size: int | Sequence[int] | None = None,
    num_channels: int = 3,
) -> nn.Module:
    """Builds the preprocessing module for ``kind`` (one of ``PREPROCESS``).

    Args:
        kind: ``"none"`` (identity), ``"pretrained"`` (``Normalize(mean, std)``, already fitted), ``"dataset"``
            (``Normalize`` fitted on the train split), ``"pca"`` / ``"zca"`` (``Whitening``).
        mean: Per-channel mean, used (and required) only by ``"pretrained"``.
        std: Per-channel std, used (and required) only by ``"pretrained"``.
        scope: Whitening scope, ``"channel"`` or ``"image"`` (pca/zca only).
        eps: Whitening regulariser; ``None`` = ``DEFAULT_EPS[scope]`` (pca/zca only).
        image_size: H or (H, W), required for ``scope="image"``.
        num_channels: Number of input channels.

    Returns:
        A module with ``fit(batches)``; check ``needs_fit`` before using it.
    """
    if kind == "none":
        return Identity()
    if kind == "pretrained":
        if mean is None or std is None:
            raise ValueError(
                'preprocess="pretrained" needs the backbone\'s mean and std (e.g. its pretrained config); '
                'pass mean=..., std=... or use preprocess="dataset" to fit them on the train split'
            )
        return Normalize(mean, std, num_channels=num_channels)
    if kind == "dataset":
        return Normalize(num_channels=num_channels)
    if kind in ("pca", "zca"):
        return Whitening(kind, scope=scope, eps=eps, num_channels=num_channels, image_size=image_size)
    raise ValueError(f"unknown preprocess {kind!r}; choose one of {PREPROCESS}")


def needs_fit(module: nn.Module) -> bool:
    """Whether ``module`` has a ``fit`` method and has not been fitted (or restored from a fitted state_dict)."""
    return callable(getattr(module, "fit", None)) and not getattr(module, "is_fitted", True)


# ------------------------------------------------------------------------------------------------------ rendering


def _display_range(y: Tensor) -> Tensor:
    """Maps each image's mean +- 3 std (over all its channels and pixels) to [0, 1], clipping the rest.

    Whitened outputs are heavy-tailed, so per-image min-max would let a few outlier pixels flatten everything else.
    """
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    std = y.std(dim=(1, 2, 3), keepdim=True)
    return ((y - mean) / (3 * std + 1e-8)).clamp(-1, 1) * 0.5 + 0.5


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _grid_columns(images: Tensor, modules: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """Returns the columns to draw as (N, H, W, C) CPU arrays in [0, 1]: the original, then each module's output."""
    x = _unit_float(images).float()
    columns = {"original": x.clamp(0, 1)}
    with torch.no_grad():
        for name, module in modules.items():
            out = module(x.to(_module_device(module))).float().cpu()
            columns[name] = _display_range(out)
    return {name: col.permute(0, 2, 3, 1) for name, col in columns.items()}


def render_preprocess_grid(images: Tensor, modules: Mapping[str, nn.Module], path: str | os.PathLike) -> str:
    """Renders a PNG comparing preprocessing outputs: one row per image, one column per method.

    The first column is the input as-is; each further column is ``modules[name](images)`` rescaled for display per
    image with a 3-sigma clip (mean +- 3 std of that image -> [0, 1]). Modules must already be fitted. The file is
    written atomically (temporary file in the same folder, then ``os.replace``).

    Args:
        images: (N, C, H, W) uint8, or float in [0, 1]; C is 1 or 3.
        modules: Column title -> fitted preprocessing module (e.g. ``{"normalised": ..., "ZCA-whitened": ...}``).
        path: Destination PNG path; parent folders are created.

    Returns:
        ``path`` as a string.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state or backend switch, Agg canvas by default

    from tlkit.plots import save_figure  # atomic PNG writes, shared with the other figures

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W), got {tuple(images.shape)}")
    columns = _grid_columns(images, modules)
    rows, cols = images.shape[0], len(columns)
    fig = Figure(figsize=(2.0 * cols, 2.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for j, (name, col) in enumerate(columns.items()):
        axes[0, j].set_title(name, fontsize=9)
        for i in range(rows):
            img = col[i].numpy()
            axes[i, j].imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_axis_off()
    return save_figure(fig, path)
