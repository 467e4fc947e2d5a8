"""Tests for tlkit.data.preprocess on real photo patches (scikit-image sample images)."""

from __future__ import annotations

import io
import os
import socket

import matplotlib.image as mpimg
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from skimage import data as skdata
from torch import Tensor

from tlkit.data.preprocess import (
    DEFAULT_EPS,
    MAX_IMAGE_DIM,
    PREPROCESS,
    Identity,
    Normalize,
    Whitening,
    build_preprocess,
    needs_fit,
    render_preprocess_grid,
)

PHOTOS = (skdata.astronaut, skdata.coffee, skdata.chelsea)


def _photo_patches(size: int, per_photo: int, seed: int = 0) -> Tensor:
    """Random (N, 3, size, size) float patches in [0, 1] from three RGB photos."""
    gen = torch.Generator().manual_seed(seed)
    patches = []
    for photo in PHOTOS:
        img = torch.from_numpy(photo()).permute(2, 0, 1).float() / 255.0
        rows = torch.randint(0, img.shape[1] - size, (per_photo,), generator=gen).tolist()
        cols = torch.randint(0, img.shape[2] - size, (per_photo,), generator=gen).tolist()
        patches += [img[:, r : r + size, c : c + size] for r, c in zip(rows, cols, strict=True)]
    return torch.stack(patches)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def patches8() -> Tensor:
    """1200 RGB 8x8 patches: D = 192 < N, so the image-scope covariance is full rank."""
    return _photo_patches(8, 400)


@pytest.fixture(scope="module")
def patches16() -> Tensor:
    """600 RGB 16x16 patches."""
    return _photo_patches(16, 200, seed=1)


def _rows(out: Tensor, scope: str) -> Tensor:
    """Output samples as float64 rows: pixels (channel scope) or flattened images (image scope)."""
    out = out.double()
    return out.movedim(1, -1).reshape(-1, out.shape[1]) if scope == "channel" else out.flatten(1)


def _population_cov(rows: Tensor) -> Tensor:
    centred = rows - rows.mean(0)
    return centred.T @ centred / rows.shape[0]


# ----------------------------------------------------------------------------------------------- normalisation


def test_dataset_normalize_gives_zero_mean_unit_std(patches16: Tensor) -> None:
    norm = Normalize().fit(patches16.split(64))
    out = norm(patches16)
    mean = out.mean(dim=(0, 2, 3))
    std = out.double().std(dim=(0, 2, 3), correction=0)
    assert mean.abs().max() < 1e-3
    assert (std - 1).abs().max() < 1e-2


def test_pretrained_normalize_is_fitted_and_validates() -> None:
    norm = build_preprocess("pretrained", mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.25])
    assert isinstance(norm, Normalize) and not needs_fit(norm)
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.2, 0.25]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    with pytest.raises(ValueError, match="mean and std"):
        build_preprocess("pretrained")
    with pytest.raises(ValueError, match="3 values"):
        Normalize([0.5], [0.2])
    with pytest.raises(ValueError, match="> 0"):
        Normalize([0.5] * 3, [0.2, 0.0, 0.2])


def test_build_preprocess_kinds_and_needs_fit() -> None:
    assert PREPROCESS == ("none", "pretrained", "dataset", "pca", "zca")
    none = build_preprocess("none")
    x = torch.rand(2, 3, 4, 4)
    assert isinstance(none, Identity) and not needs_fit(none)
    assert none.fit(iter(())) is none and torch.equal(none(x), x)
    assert needs_fit(build_preprocess("dataset"))
    zca = build_preprocess("zca", scope="image", image_size=4)
    assert isinstance(zca, Whitening) and zca.kind == "zca" and zca.eps == DEFAULT_EPS["image"] and needs_fit(zca)
    assert build_preprocess("pca").scope == "channel"
    assert not needs_fit(torch.nn.Identity())
    with pytest.raises(ValueError, match="unknown preprocess"):
        build_preprocess("imagenet")


# ------------------------------------------------------------------------------------------------- whitening


@pytest.mark.parametrize("kind", ["pca", "zca"])
def test_image_scope_whitening_makes_train_data_white(patches8: Tensor, kind: str) -> None:
    eps = 1e-6  # tiny, so that over half of the 192 directions are whitened (not just damped) and get checked
    module = Whitening(kind, scope="image", image_size=8, eps=eps).fit(patches8.split(100))
    out = _rows(module(patches8), "image")
    assert out.mean(0).abs().max() < 1e-3
    evals, evecs = torch.linalg.eigh(_population_cov(_rows(patches8, "image")))
    evals, evecs = evals.flip(0), evecs.flip(1)
    # PCA output coordinates already are the eigen-directions; ZCA output is rotated back by U.
    cov = _population_cov(out)
    cov = cov if kind == "pca" else evecs.T @ cov @ evecs
    kept = evals > 100 * eps  # whitened output variance lambda / (lambda + eps) >= 0.99 there
    assert kept.sum() > 96
    eye = torch.eye(int(kept.sum()), dtype=torch.float64)
    assert (cov[kept][:, kept] - eye).abs().max() < 0.05
    # Everywhere else the variance is exactly the documented lambda / (lambda + eps), still uncorrelated.
    expected = torch.diag(evals.clamp_min(0) / (evals.clamp_min(0) + eps))
    assert (cov - expected).abs().max() < 0.05


@pytest.mark.parametrize("kind", ["pca", "zca"])
def test_channel_scope_whitening_makes_pixel_colours_white(patches16: Tensor, kind: str) -> None:
    module = Whitening(kind).fit(patches16.split(64))
    assert module.eps == DEFAULT_EPS["channel"] and module.matrix.shape == (3, 3)
    assert (module.eigenvalues > 100 * module.eps).all()  # every colour direction is really whitened
    out = module(patches16)
    assert out.shape == patches16.shape
    rows = _rows(out, "channel")
    assert rows.mean(0).abs().max() < 1e-3
    assert (_population_cov(rows) - torch.eye(3, dtype=torch.float64)).abs().max() < 0.05


@pytest.mark.parametrize("scope", ["channel", "image"])
def test_zca_is_symmetric_and_closest_to_input(patches8: Tensor, scope: str) -> None:
    zca = Whitening("zca", scope=scope, image_size=8, eps=1e-4).fit([patches8])
    pca = Whitening("pca", scope=scope, image_size=8, eps=1e-4).fit([patches8])
    torch.testing.assert_close(zca.matrix, zca.matrix.T, rtol=0, atol=0)
    centred = _rows(patches8, scope) - _rows(patches8, scope).mean(0)
    white_zca, white_pca = _rows(zca(patches8), scope), _rows(pca(patches8), scope)
    rotation, _ = torch.linalg.qr(torch.randn(centred.shape[1], centred.shape[1], dtype=torch.float64))
    white_rot = white_zca @ rotation.T  # Q * ZCA(x): just as white, but rotated

    def distance(white: Tensor) -> float:
        return (white - centred).pow(2).sum(1).mean().item()

    # The rotation keeps every sample's norm, so the comparison is only about alignment with the input.
    torch.testing.assert_close(white_rot.norm(dim=1), white_zca.norm(dim=1))
    assert distance(white_zca) < distance(white_pca)
    assert distance(white_zca) < distance(white_rot)


def test_pca_components_are_ordered_by_variance_and_uncorrelated(patches8: Tensor) -> None:
    eps = 1e-4
    pca = Whitening("pca", scope="image", image_size=8, eps=eps).fit([patches8])
    evals = pca.eigenvalues.double()
    assert (evals[:-1] >= evals[1:]).all()
    out = _rows(pca(patches8), "image")
    # Undo the 1/sqrt(lambda + eps) scaling: component i then has variance lambda_i, in decreasing order.
    unscaled_var = (out * (evals + eps).sqrt()).var(0, correction=0)
    top = evals > 1e-3
    torch.testing.assert_close(unscaled_var[top], evals[top], rtol=1e-3, atol=0)
    cov = _population_cov(out)
    assert (cov - torch.diag(torch.diag(cov))).abs().max() < 1e-3


@pytest.mark.parametrize(
    "make",
    [
        lambda: Normalize(),
        lambda: Whitening("pca"),
        lambda: Whitening("zca"),
        lambda: Whitening("pca", scope="image", image_size=8, eps=1e-3),
        lambda: Whitening("zca", scope="image", image_size=8, eps=1e-3),
    ],
    ids=["normalize", "pca-channel", "zca-channel", "pca-image", "zca-image"],
)
def test_streaming_fit_equals_one_shot_fit(patches8: Tensor, make) -> None:  # noqa: ANN001
    labels = torch.zeros(len(patches8), dtype=torch.long)
    # A generator of (x, y) tuples in batches of 7: any iterable works and labels are ignored.
    streamed = make().fit((x, y) for x, y in zip(patches8.split(7), labels.split(7), strict=True))
    one_shot = make().fit([patches8])
    for name, value in one_shot.state_dict().items():
        torch.testing.assert_close(streamed.state_dict()[name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_uint8_batches_are_scaled_like_the_data_module(patches8: Tensor) -> None:
    as_uint8 = (patches8 * 255).round().to(torch.uint8)
    from_uint8 = Whitening("zca", scope="image", image_size=8, eps=1e-3).fit([as_uint8])
    from_float = Whitening("zca", scope="image", image_size=8, eps=1e-3).fit([as_uint8.float() / 255])
    torch.testing.assert_close(from_uint8.matrix, from_float.matrix)


@pytest.mark.parametrize(
    "make",
    [lambda: Normalize(), lambda: Whitening("zca"), lambda: Whitening("pca", scope="image", image_size=8, eps=1e-3)],
    ids=["normalize", "zca-channel", "pca-image"],
)
def test_state_dict_round_trip_restores_without_refitting(patches8: Tensor, make) -> None:  # noqa: ANN001
    fitted = make().fit(patches8.split(100))
    buffer = io.BytesIO()
    torch.save(fitted.state_dict(), buffer)
    fresh = make()
    assert needs_fit(fresh)
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh(patches8)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert not needs_fit(fresh) and bool(fresh.fitted)
    assert torch.equal(fresh(patches8), fitted(patches8))


def test_modules_export_with_torch_export(patches8: Tensor) -> None:
    x = patches8[:16]
    for module in (Normalize().fit([x]), Whitening("zca").fit([x]), Whitening("pca", "image", image_size=8).fit([x])):
        exported = torch.export.export(module, (x,))
        torch.testing.assert_close(exported.module()(x), module(x))


def test_image_scope_size_limit_and_shape_checks() -> None:
    with pytest.raises(ValueError, match="channel") as info:
        Whitening("zca", scope="image", image_size=64)
    assert "12288" in str(info.value) and str(MAX_IMAGE_DIM) in str(info.value)
    assert Whitening("zca", scope="image", image_size=(32, 32)).matrix.shape == (MAX_IMAGE_DIM, MAX_IMAGE_DIM)
    with pytest.raises(ValueError, match="image_size"):
        Whitening("pca", scope="image")
    with pytest.raises(ValueError, match="3, 8, 8"):
        Whitening("pca", scope="image", image_size=8).fit([torch.rand(4, 3, 16, 16)])
    with pytest.raises(ValueError, match="at least 2 samples"):
        Normalize().fit([])


# ------------------------------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_modules() -> dict[str, torch.nn.Module]:
    return {
        "normalize": Normalize(),
        "zca-image": Whitening("zca", scope="image", image_size=8, eps=1e-3),
        "pca-channel": Whitening("pca"),
    }


def _ddp_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """Fits every module on this rank's half of the data and saves the resulting state dicts."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        shard = torch.load(os.path.join(folder, "data.pt")).chunk(world_size)[rank]
        states = {name: m.fit(shard.split(50)).state_dict() for name, m in _ddp_modules().items()}
        torch.save(states, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_fit_reduces_shards_to_identical_statistics(patches8: Tensor, tmp_path) -> None:  # noqa: ANN001
    torch.save(patches8, tmp_path / "data.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name, module in _ddp_modules().items():
        single = module.fit([patches8]).state_dict()
        for key, value in single.items():
            assert torch.equal(rank0[name][key], rank1[name][key]), f"{name}.{key} differs across ranks"
            torch.testing.assert_close(rank0[name][key], value, rtol=1e-6, atol=1e-6, msg=f"{name}.{key}")


# ------------------------------------------------------------------------------------------------- rendering


def test_render_preprocess_grid_writes_png(patches16: Tensor, tmp_path) -> None:  # noqa: ANN001
    modules = {
        "normalised": Normalize().fit([patches16]),
        "PCA-whitened": Whitening("pca").fit([patches16]),
        "ZCA-whitened": Whitening("zca").fit([patches16]),
    }
    images = (patches16[:4] * 255).to(torch.uint8)
    path = tmp_path / "plots" / "grid.png"
    assert render_preprocess_grid(images, modules, path) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(path.parent) == ["grid.png"]  # no temporary file left behind
    # 200 px per panel: 4 rows (images) x 4 columns (original + 3 methods).
    assert mpimg.imread(path).shape == (4 * 200, 4 * 200, 4)


def test_uint8_input_equals_float_input_scaled(patches8: Tensor) -> None:
    as_uint8 = (patches8 * 255).round().to(torch.uint8)
    as_float = as_uint8.float() / 255
    modules = [
        Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # the data module's hot path: one fused pass
        Whitening("zca").fit([as_float]),
        build_preprocess("none"),
    ]
    for module in modules:
        out = module(as_uint8)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, module(as_float), rtol=1e-5, atol=1e-5)
