"""Linear probe on features extracted once (tlkit.LinearProbe) vs a frozen backbone run every epoch, and vs
scikit-learn's LogisticRegression on the same features.

Speed, in the same run, same data (the `textures` images at 64 px of ``recipes/linear_probe.yaml``, augmentation off)
and the same number of epochs:

- baseline: ``TransferClassifier`` with the whole backbone frozen (``freeze: backbone``), trained with the quickstart
  recipe's optimiser settings (SGD) on batches of 32: the backbone runs on every batch of every epoch.
- tlkit: ``LinearProbe`` of ``recipes/linear_probe.yaml``: ``probe.feature_data(dm)`` runs the backbone once over the
  train and val images in batches of 32 (timed), then full-batch L-BFGS trains the head on the features.

Each timing covers the data set-up, the backbone passes, training and validation (``fit``); the models are built
before the clock starts. The ratio is baseline time / tlkit time (min over interleaved repeats).

Quality: LogisticRegression (C=1) fitted on the probe's train features, scored on its val features, vs the probe of
``recipes/linear_probe.yaml`` (full-batch L-BFGS on the same objective: weight decay 1/N is the L2 penalty of C=1)
over several seeds. The val split has 160 images (one image = 0.625 points) and the train features are separable, so
where an optimiser stops moves the val accuracy by a few images: LogisticRegression is reported at its default
tolerance and at convergence (the optimum of its objective, the standard protocol), and every probe is also scored on
more patches (``--more_val`` per class) cut from the same held-out band of each photo as the val set, with the share
of those patches on which the probe and the converged LogisticRegression predict the same class.

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
from torch.utils.data import DataLoader

from tlkit import ImageDataModule, LinearProbe, TransferClassifier, extract_features
from tlkit.backbones import backbone_data_config
from tlkit.data import sources
from tlkit.data.sources import ImageDataset
from tlkit.data.splits import Split

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PROBE_RECIPE = RECIPES / "linear_probe.yaml"  # the probe, its data; full-batch L-BFGS, the L2 of C=1
BASELINE_RECIPE = RECIPES / "quickstart.yaml"  # the optimiser settings of the frozen-backbone baseline


def _init_args(recipe: Path, section: str) -> dict:
    return dict(yaml.safe_load(recipe.read_text())[section]["init_args"])


def _trainer(epochs: int) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, deterministic=True, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def _data() -> ImageDataModule:
    """The probe recipe's images, prepared for its backbone (both sides run the same backbone and weights)."""
    model = _init_args(PROBE_RECIPE, "model")
    data_config = backbone_data_config(model["backbone"], model["pretrained"])
    return ImageDataModule(**_init_args(PROBE_RECIPE, "data"), data_config=data_config)


def baseline(epochs: int, seed: int = 0) -> tuple[float, float]:
    """Wall time of ``fit`` of the frozen-backbone TransferClassifier (backbone on every batch) and its val acc."""
    L.seed_everything(seed, verbose=False)
    model_args = {**_init_args(BASELINE_RECIPE, "model"), "freeze": "backbone"}
    dm = _data()
    model = TransferClassifier(**model_args, num_classes=dm.num_classes)
    trainer = _trainer(epochs)
    start = time.perf_counter()
    trainer.fit(model, dm)
    elapsed = time.perf_counter() - start
    return elapsed, trainer.callback_metrics["val/acc"].item()


def probe(epochs: int, seed: int = 0) -> tuple[float, float, LinearProbe, ImageDataModule]:
    """Wall time of the feature extraction plus ``fit`` of the LinearProbe, its val acc, the probe and its data."""
    L.seed_everything(seed, verbose=False)
    dm = _data()
    model = LinearProbe(**_init_args(PROBE_RECIPE, "model"), num_classes=dm.num_classes)
    trainer = _trainer(epochs)
    start = time.perf_counter()
    trainer.fit(model, model.feature_data(dm))
    elapsed = time.perf_counter() - start
    return elapsed, trainer.callback_metrics["val/acc"].item(), model, dm


def held_out_patches(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """More val images: ``per_class`` other random patches per photo from the held-out band the textures val set is
    cut from (train patches come from the rows above it), as uint8 ``(N, 64, 64, 3)`` and their labels."""
    patches = []
    for label, name in enumerate(sources.TEXTURE_PHOTOS):
        photo = sources.load_texture_photo(name)
        _, corners = sources.texture_patch_coords(*photo.shape[:2], n_train=0, n_val=per_class, seed=1000 + label)
        patches.append(torch.from_numpy(sources._crop(photo, corners)))  # the textures source's own cutter
    labels = torch.arange(len(patches)).repeat_interleave(per_class)
    return torch.cat(patches), labels


def backbone_features(model: LinearProbe, dm: ImageDataModule, images: torch.Tensor) -> torch.Tensor:
    """The probe's features of these images, through the data module's evaluation transform (as its val images)."""
    dataset = ImageDataset(Split(list(images.numpy()), [-1] * len(images)), dm.transform(train=False))
    return extract_features(model.backbone, DataLoader(dataset, batch_size=64)).features


def sklearn_probe(
    train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], more_val: tuple[torch.Tensor, ...]
) -> dict[str, tuple[float, float, torch.Tensor]]:
    """The standard linear-probe protocol: LogisticRegression on the frozen features, stopped at scikit-learn's
    default tolerance and run to convergence; accuracy on val and on ``more_val``, and its predictions there."""
    from sklearn.linear_model import LogisticRegression

    scores = {}
    for name, tol in (("default tol=1e-4", 1e-4), ("converged tol=1e-8", 1e-8)):
        classifier = LogisticRegression(tol=tol, max_iter=10_000).fit(train[0].numpy(), train[1].numpy())
        scores[f"{name}, {classifier.n_iter_[0]} iterations"] = (
            classifier.score(val[0].numpy(), val[1].numpy()),
            classifier.score(more_val[0].numpy(), more_val[1].numpy()),
            torch.as_tensor(classifier.predict(more_val[0].numpy())),
        )
    return scores


def speed(args: argparse.Namespace) -> None:
    times: dict[str, list[float]] = {"baseline": [], "probe": []}
    accs: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, so a load spike hits both
        elapsed, accs["baseline"] = baseline(args.epochs)
        times["baseline"].append(elapsed)
        elapsed, accs["probe"], _, _ = probe(args.epochs)
        times["probe"].append(elapsed)
    print(f"{args.epochs}-epoch linear probe on textures (64 px), {args.threads} thread(s), {args.repeats} repeats")
    labels = {
        "baseline": "frozen-backbone TransferClassifier (backbone every epoch)",
        "probe": "tlkit.LinearProbe (features extracted once, extraction timed)",
    }
    for key, label in labels.items():
        t = times[key]
        print(f"  {label:62s} min {min(t):6.1f} s  median {statistics.median(t):6.1f} s  val/acc {accs[key]:.4f}")
    print(f"  speed-up (min/min): {min(times['baseline']) / min(times['probe']):.1f}x")


def quality(args: argparse.Namespace) -> None:
    elapsed, val_accs, more_accs, agreement, lr_scores = [], [], [], [], None
    images, labels = held_out_patches(args.more_val)
    for seed in range(args.seeds):
        seconds, acc, model, dm = probe(args.probe_epochs, seed=seed)
        elapsed.append(seconds)
        val_accs.append(acc)
        more = backbone_features(model, dm, images)
        if lr_scores is None:  # the features do not depend on the seed: one LogisticRegression fit
            data = model.feature_data(dm)
            train, val = (data.train_set.features, data.train_set.labels), (data.val_set.features, data.val_set.labels)
            lr_scores = sklearn_probe(train, val, (more, labels))
            converged = list(lr_scores.values())[-1][2]
            n_val = len(val[1])
        with torch.no_grad():
            predicted = model.eval()(more).argmax(1)
        more_accs.append((predicted == labels).float().mean().item())
        agreement.append((predicted == converged).float().mean().item())
    print(f"  quality, val acc on the {n_val} val images | on {len(labels)} more held-out patches:")
    for name, (score, more_score, _) in lr_scores.items():
        print(f"    sklearn LogisticRegression(C=1), {name}: {score:.4f} | {more_score:.4f}")
    print(f"    tlkit.LinearProbe, recipes/{PROBE_RECIPE.name} ({args.probe_epochs} epochs), seeds 0-{args.seeds - 1} "
          f"({statistics.mean(elapsed):.1f} s each): mean {statistics.mean(val_accs):.4f} "
          f"(min {min(val_accs):.4f}, max {max(val_accs):.4f}) | mean {statistics.mean(more_accs):.4f} "
          f"(min {min(more_accs):.4f}, max {max(more_accs):.4f}); same class as the converged "
          f"LogisticRegression on {min(agreement):.2%} or more of the held-out patches")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of both sides of the speed comparison")
    probe_epochs = yaml.safe_load(PROBE_RECIPE.read_text())["trainer"]["max_epochs"]
    parser.add_argument("--probe_epochs", type=int, default=probe_epochs, help="epochs of the quality run's probe")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the probe in the quality run (0: skip it)")
    parser.add_argument("--more_val", type=int, default=256, help="more held-out patches per class for the quality run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on shared CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    speed(args)
    if args.seeds:
        quality(args)


if __name__ == "__main__":
    main()
