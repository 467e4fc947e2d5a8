"""Every pretrained weight's evaluation transform, against the weights' own: does tlkit show each model what its
weights were evaluated on?

For every pretrained tag timm lists (``timm.list_pretrained()``) tlkit's data config (``backbone_data_config(tag)``,
the architecture built on the meta device: no weights) must equal timm's ``resolve_data_config`` of that tag in every
field that shapes the image (input size, interpolation, crop fraction, crop mode, mean, std). Then, once per distinct
config, tlkit's transform (``eval_transform``: uint8 tensors, then normalised) must give the tensors of timm's
``create_transform(is_training=False)`` on real non-square photos (landscape and portrait, scikit-image's), within
the tolerance of tests/test_eval_transform.py. The same for every torchvision classification weight
(``weights.transforms()``).

    python benchmarks/eval_transforms.py               # every tag (~1,800 meta builds: a few minutes) and weight
    python benchmarks/eval_transforms.py --limit 100   # a sample of the tags
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision
from PIL import Image
from skimage import data as skimage_data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_eval_transform import MAX_SHARE_OFF_BY_MORE_THAN_ONE, MEAN_LEVELS  # noqa: E402  (one tolerance, one place)

from tlkit import backbone_data_config  # noqa: E402
from tlkit.backbones import _torchvision_data_config  # noqa: E402
from tlkit.data.datamodule import eval_transform  # noqa: E402

FIELDS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
PHOTOS = {
    "coffee 400x600": skimage_data.coffee(),
    "coffee 600x400": np.ascontiguousarray(np.rot90(skimage_data.coffee())),
}


def _field(config: dict, name: str) -> object:
    value = config.get(name)
    return tuple(value) if isinstance(value, list | tuple) else value  # (3, 224, 224) and [3, 224, 224] alike


def _key(config: dict) -> tuple:
    return tuple(_field(config, f) for f in FIELDS)


def compare_images(config: dict, reference) -> str | None:
    """Why tlkit's transform of ``config`` differs from ``reference`` (a PIL -> tensor transform), if it does."""
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    for label, photo in PHOTOS.items():
        ours = (eval_transform(config)(torch.from_numpy(photo).permute(2, 0, 1)).float() / 255 - mean) / std
        theirs = reference(Image.fromarray(photo))
        if ours.shape != theirs.shape:
            return f"{label}: shape {tuple(ours.shape)}, the weights' {tuple(theirs.shape)}"
        levels = (ours - theirs).abs() * std * 255
        off = float((levels > 1.5).float().mean())
        if levels.mean() > MEAN_LEVELS or off > MAX_SHARE_OFF_BY_MORE_THAN_ONE:
            return f"{label}: {levels.mean():.2f} grey levels off on average, {off:.2%} of the pixels by more than 1"
    return None


def timm_sweep(tags: list[str]) -> tuple[int, list[str], list[str], int]:
    """(tags whose config matches, failures, tags tlkit refuses or warns about with its reason, distinct configs
    compared)."""
    failures, refused, matched, distinct = [], [], 0, {}
    for tag in tags:
        expected = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(tag).to_dict())
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ours = backbone_data_config(tag)
        except ValueError as err:  # tlkit's refusals name the model and why (timm's multimodal encoders)
            refused.append(f"{tag}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - every failure is a result to report
            failures.append(f"{tag}: backbone_data_config raised {type(err).__name__}: {err}")
            continue
        wrong = [f"{f} {_field(ours, f)!r} != {_field(expected, f)!r}" for f in FIELDS
                 if _field(ours, f) != _field(expected, f)]  # fmt: skip
        said = [str(w.message) for w in caught if "pretrained config of" in str(w.message)]
        if wrong and said:  # timm built the model under another one's config, and tlkit told the user
            refused.append(f"{tag}: {'; '.join(wrong)}; tlkit warns: {said[0]}")
            continue
        if wrong:
            failures.append(f"{tag}: data config differs: {'; '.join(wrong)}")
            continue
        matched += 1
        distinct.setdefault(_key(expected), (tag, expected))
    for tag, config in distinct.values():
        if why := compare_images(config, timm.data.create_transform(**config, is_training=False)):
            failures.append(f"{tag} ({config['crop_mode']}, crop_pct {config['crop_pct']}): {why}")
    return matched, failures, refused, len(distinct)


def torchvision_sweep() -> tuple[int, list[str]]:
    checked, failures = 0, []
    for arch in torchvision.models.list_models(module=torchvision.models):
        for weights in torchvision.models.get_model_weights(arch):
            checked += 1
            if why := compare_images(_torchvision_data_config(weights), weights.transforms()):
                failures.append(f"torchvision/{arch} {weights}: {why}")
    return checked, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="check a seeded random sample of this many timm tags")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tags = timm.list_pretrained()
    if args.limit:
        tags = sorted(random.Random(0).sample(tags, min(args.limit, len(tags))))
    start = time.perf_counter()
    matched, failures, refused, distinct = timm_sweep(tags)
    tv_checked, tv_failures = torchvision_sweep()
    for line in refused:
        print("REFUSED/WARNED", line)
    for line in failures + tv_failures:
        print("FAIL", line)
    print(f"timm: {matched}/{len(tags)} tags' data configs equal timm's, {len(refused)} refused or warned about, "
          f"with the reason; "
          f"{distinct} distinct configs compared on "
          f"{len(PHOTOS)} photos; torchvision: {tv_checked} weights compared; "
          f"{len(failures) + len(tv_failures)} failures; {time.perf_counter() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
