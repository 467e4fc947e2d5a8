"""Cached linear probe vs the same training without the cache, and vs scikit-learn's LogisticRegression.

The quickstart recipe (tf_efficientnet_lite0 with its packaged ImageNet weights, `textures`, 64 px) turned into a
linear probe: whole backbone frozen, augmentation off, 10 epochs. Baseline: `feature_cache=False` (the backbone runs
on every batch of every epoch). tlkit: `feature_cache=True` (features computed once). Same seed, same everything else.
Quality: LogisticRegression (C=1) fitted on the same extracted train features, scored on the val features, vs the
cached probe run as a linear probe (no dropout or label smoothing, Adam, the same L2 penalty as C=1, more epochs:
they cost little once the features are cached), over several seeds. The val split has 160 images (one image = 0.625
points) and the train features are separable, so where an optimiser stops moves the val accuracy by a few images:
LogisticRegression is reported at its default tolerance and at convergence (the exact optimum of its objective).

    python benchmarks/linear_probe_cache.py [--repeats 2] [--epochs 10] [--threads 1] [--seeds 4]
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
from tlkit.features import extract_features

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def build(cache: bool, **overrides) -> tuple[TransferClassifier, ImageDataModule]:
    recipe = yaml.safe_load(RECIPE.read_text())
    model_args = {**recipe["model"]["init_args"], "freeze": "backbone", "feature_cache": cache, **overrides}
    data_args = {**recipe["data"]["init_args"], "augment": "none"}
    dm = ImageDataModule(**data_args)
    model = TransferClassifier(**model_args, num_classes=dm.num_classes, class_names=dm.class_names)
    return model, dm


def probe(
    cache: bool, epochs: int, seed: int = 0, **overrides
) -> tuple[float, float, TransferClassifier, ImageDataModule]:
    """Wall time of ``fit`` (data set-up, training and validation) and the final val accuracy."""
    L.seed_everything(seed, verbose=False)
    model, dm = build(cache, **overrides)
    trainer = L.Trainer(
        max_epochs=epochs, deterministic=True, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, dm)
    elapsed = time.perf_counter() - start
    return elapsed, trainer.callback_metrics["val/acc"].item(), model, dm


def sklearn_probe(model: TransferClassifier, dm: ImageDataModule) -> dict[str, float]:
    """The standard linear-probe protocol: LogisticRegression on the frozen features of the same images, stopped at
    scikit-learn's default tolerance and run to convergence."""
    from sklearn.linear_model import LogisticRegression

    feats = extract_features(model, dm, batch_size=64)
    train, val = feats.split("train"), feats.split("val")
    scores = {}
    for name, tol in (("default tol=1e-4", 1e-4), ("converged tol=1e-8", 1e-8)):
        classifier = LogisticRegression(tol=tol, max_iter=10_000).fit(train.features.numpy(), train.labels.numpy())
        score = classifier.score(val.features.numpy(), val.labels.numpy())
        scores[f"{name}, {classifier.n_iter_[0]} iterations"] = score
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--probe_epochs", type=int, default=100, help="epochs of the cached probe in the quality run")
    parser.add_argument("--seeds", type=int, default=4, help="seeds of the cached probe in the quality run")
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
    lr_scores = sklearn_probe(model, dm)
    # sklearn's C=1 penalises 0.5 * |W|^2 against the summed loss: weight decay 1 / (C * N) on the mean loss.
    l2 = 1.0 / len(dm.data.train)
    linear = dict(optimizer="adam", lr=3e-3, weight_decay=l2, head=dict(dropout=0.0), label_smoothing=0.0,
                  warmup_epochs=0)  # fmt: skip
    runs = [probe(True, args.probe_epochs, seed=seed, **linear)[:2] for seed in range(args.seeds)]
    probe_accs = [acc for _, acc in runs]
    for name, score in lr_scores.items():
        print(f"  quality: sklearn LogisticRegression(C=1), {name}: val acc {score:.4f}")
    print(f"           tlkit cached probe, recipe settings, {args.epochs} epochs: val acc {accs[True]:.4f}")
    print(f"           tlkit cached probe, Adam lr 3e-3, weight decay 1/N, {args.probe_epochs} epochs, "
          f"seeds 0-{args.seeds - 1}: val acc mean {statistics.mean(probe_accs):.4f} "
          f"(min {min(probe_accs):.4f}, max {max(probe_accs):.4f}; {runs[0][0]:.1f} s each)")  # fmt: skip


if __name__ == "__main__":
    main()
