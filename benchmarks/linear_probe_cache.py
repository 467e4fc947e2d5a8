"""Cached linear probe vs the same training without the cache, and vs scikit-learn's LogisticRegression.

The quickstart recipe (tf_efficientnet_lite0 with its packaged ImageNet weights, `textures`, 64 px) turned into a
linear probe: whole backbone frozen, augmentation off, 10 epochs. Baseline: `feature_cache=False` (the backbone runs
on every batch of every epoch). tlkit: `feature_cache=True` (features computed once). Same seed, same everything else.
Quality: LogisticRegression (C=1) fitted on the same extracted train features, scored on the val features, vs the
cached probe of ``recipes/linear_probe.yaml`` (full-batch L-BFGS on the same objective: weight decay 1/N is the L2
penalty of C=1, no dropout or label smoothing), over several seeds. The val split has 160 images (one image = 0.625
points) and the train features are separable, so where an optimiser stops moves the val accuracy by a few images:
LogisticRegression is reported at its default tolerance and at convergence (the exact optimum of its objective, the
standard protocol), and every probe is also scored on more patches (``--more_val`` per class) cut from the same
held-out band of each photo as the val set, with the share of those patches on which the probe and the converged
LogisticRegression predict the same class.

    python benchmarks/linear_probe_cache.py [--repeats 2] [--epochs 10] [--threads 1] [--seeds 2] [--more_val 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from tlkit import ImageDataModule, TransferClassifier
from tlkit.data import sources
from tlkit.data.sources import ImageDataset, Split
from tlkit.features import _compute_features, extract_features

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
RECIPE = RECIPES / "quickstart.yaml"
PROBE_RECIPE = RECIPES / "linear_probe.yaml"  # linear-probe settings: full-batch L-BFGS, the L2 of C=1, no dropout


def build(cache: bool, recipe_path: Path = RECIPE) -> tuple[TransferClassifier, ImageDataModule]:
    recipe = yaml.safe_load(recipe_path.read_text())
    model_args = {**recipe["model"]["init_args"], "freeze": "backbone", "feature_cache": cache}
    data_args = {**recipe["data"]["init_args"], "augment": "none"}
    dm = ImageDataModule(**data_args)
    model = TransferClassifier(**model_args, num_classes=dm.num_classes, class_names=dm.class_names)
    return model, dm


def probe(
    cache: bool, epochs: int, seed: int = 0, recipe_path: Path = RECIPE
) -> tuple[float, float, TransferClassifier, ImageDataModule]:
    """Wall time of ``fit`` (data set-up, training and validation) and the final val accuracy."""
    L.seed_everything(seed, verbose=False)
    model, dm = build(cache, recipe_path)
    trainer = L.Trainer(
        max_epochs=epochs, deterministic=True, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, dm)
    elapsed = time.perf_counter() - start
    return elapsed, trainer.callback_metrics["val/acc"].item(), model, dm


def held_out_patches(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """More val images: ``per_class`` other random patches per photo from the held-out band the textures val set is
    cut from (train patches come from the rows above it), as uint8 ``(N, 3, 64, 64)`` and their labels."""
    patches = []
    for label, name in enumerate(sources.TEXTURE_PHOTOS):
        photo = sources.load_texture_photo(name)
        _, corners = sources.texture_patch_coords(*photo.shape[:2], n_train=0, n_val=per_class, seed=1000 + label)
        patches.append(torch.from_numpy(sources._crop(photo, corners)))  # the textures source's own cutter
    labels = torch.arange(len(patches)).repeat_interleave(per_class)
    return torch.cat(patches).permute(0, 3, 1, 2), labels


def backbone_features(model: TransferClassifier, dm: ImageDataModule, images: torch.Tensor) -> torch.Tensor:
    """What the feature cache holds for these images, computed the way the cache computes it."""
    dataset = ImageDataset(Split(list(images), [-1] * len(images)), dm.transform(train=False))
    return _compute_features(model, dm, dataset)[0]


def sklearn_probe(
    model: TransferClassifier, dm: ImageDataModule, more_val: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, tuple[float, float, torch.Tensor]]:
    """The standard linear-probe protocol: LogisticRegression on the frozen features of the same images, stopped at
    scikit-learn's default tolerance and run to convergence; accuracy on the val split and on ``more_val``, and the
    predicted classes of ``more_val``."""
    from sklearn.linear_model import LogisticRegression

    feats = extract_features(model, dm, batch_size=64)
    train, val = feats.split("train"), feats.split("val")
    scores = {}
    for name, tol in (("default tol=1e-4", 1e-4), ("converged tol=1e-8", 1e-8)):
        classifier = LogisticRegression(tol=tol, max_iter=10_000).fit(train.features.numpy(), train.labels.numpy())
        score = classifier.score(val.features.numpy(), val.labels.numpy())
        scores[f"{name}, {classifier.n_iter_[0]} iterations"] = (
            score,
            classifier.score(more_val[0].numpy(), more_val[1].numpy()),
            torch.as_tensor(classifier.predict(more_val[0].numpy())),
        )
    return scores


@torch.no_grad()
def head_predictions(model: TransferClassifier, features: torch.Tensor) -> torch.Tensor:
    return model.eval().head(features).argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    probe_epochs = yaml.safe_load(PROBE_RECIPE.read_text())["trainer"]["max_epochs"]
    parser.add_argument("--probe_epochs", type=int, default=probe_epochs, help="epochs of the quality run's probe")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the cached probe in the quality run")
    parser.add_argument("--more_val", type=int, default=256, help="more held-out patches per class for the quality run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on shared CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[bool, list[float]] = {False: [], True: []}
    accs: dict[bool, float] = {}
    for _ in range(args.repeats):
        for cache in (False, True):  # interleaved, so a load spike hits both
            elapsed, acc, model, dm = probe(cache, args.epochs)
            times[cache].append(elapsed)
            accs[cache] = acc
    print(f"{args.epochs}-epoch linear probe, quickstart recipe, {args.threads} thread(s), {args.repeats} repeats")
    for cache, label in ((False, "baseline (no cache)"), (True, "tlkit feature_cache")):
        t = times[cache]
        print(f"  {label:22s} min {min(t):6.1f} s  median {statistics.median(t):6.1f} s  val/acc {accs[cache]:.4f}")
    speedup = min(times[False]) / min(times[True])
    print(
        f"  speed-up (min/min): {speedup:.1f}x   val/acc difference: {abs(accs[True] - accs[False]) * 100:.2f} points"
    )
    images, labels = held_out_patches(args.more_val)
    more_val = backbone_features(model, dm, images), labels
    n_val, n_more = len(dm.data.val), len(labels)
    lr_scores = sklearn_probe(model, dm, more_val)
    converged = list(lr_scores.values())[-1][2]
    elapsed, val_accs, more_accs, agreement = [], [], [], []
    for seed in range(args.seeds):
        seconds, acc, probe_model, _ = probe(True, args.probe_epochs, seed=seed, recipe_path=PROBE_RECIPE)
        elapsed.append(seconds)
        val_accs.append(acc)
        predicted = head_predictions(probe_model, more_val[0])
        more_accs.append((predicted == labels).float().mean().item())
        agreement.append((predicted == converged).float().mean().item())
    print(f"  quality, val acc on the {n_val} val images | on {n_more} more held-out patches:")
    for name, (score, more, _) in lr_scores.items():
        print(f"    sklearn LogisticRegression(C=1), {name}: {score:.4f} | {more:.4f}")
    print(f"    tlkit cached probe, recipe settings, {args.epochs} epochs: {accs[True]:.4f}")
    print(f"    tlkit cached probe, recipes/{PROBE_RECIPE.name} ({args.probe_epochs} epochs), "
          f"seeds 0-{args.seeds - 1} "
          f"({statistics.mean(elapsed):.1f} s each): mean {statistics.mean(val_accs):.4f} "
          f"(min {min(val_accs):.4f}, max {max(val_accs):.4f}) | mean {statistics.mean(more_accs):.4f} "
          f"(min {min(more_accs):.4f}, max {max(more_accs):.4f}); same class as the converged "
          f"LogisticRegression on {min(agreement):.2%} or more of the held-out patches")  # fmt: skip


if __name__ == "__main__":
    main()
