"""Tests of fine-tuning phases (tlkit.callbacks): freezing, optimizer rebuilds, layer decay, BatchNorm policy,
schedules, resume and torch.compile, on tiny real Trainers."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_trainer, write_image_folder
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tlkit import ImageDataModule, TransferClassifier
from tlkit.callbacks import FineTuningPhases, parse_phases
from tlkit.optim import layer_decay_scales
from tlkit.pairing import PairingCheck
from tlkit.resume import RngStateCheckpoint

BN_MODEL = "test_efficientnet"  # timm test model with BatchNormAct2d, 100k parameters
STAGES = ["stem", "blocks.0.0", "blocks.1.0", "blocks.2.0", "blocks.3.0", "blocks.4.0+"]


def _loader(n: int = 16, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)  # no shuffling: runs see the same batches


def _model(phases: list[dict], **kwargs) -> TransferClassifier:
    torch.manual_seed(0)
    options = dict(num_classes=3, head={"dropout": 0.0}, schedule="constant", weight_decay=0.0)
    return TransferClassifier(BN_MODEL, phases=phases, **{**options, **kwargs})


def _trainer(max_epochs: int, callbacks: list | None = None, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    return L.Trainer(max_epochs=max_epochs, callbacks=callbacks or [], **{**options, **kwargs})


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class EpochRecorder(L.Callback):
    """Snapshots at the first batch of every epoch (after the phase change) and at its end."""

    def __init__(self) -> None:
        self.start: list[dict[str, torch.Tensor]] = []
        self.end: list[dict[str, torch.Tensor]] = []
        self.trainable: list[set[str]] = []
        self.groups: list[dict[str, float]] = []
        self.optimizer_checks: list[tuple[set, set, set]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.start.append(_state(pl_module))
            self.trainable.append({n for n, p in pl_module.named_parameters() if p.requires_grad})
            self.groups.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.end.append(_state(pl_module))
        optimizer = trainer.optimizers[0]
        optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
        self.optimizer_checks.append((optimised, trainable, {id(p) for p in optimizer.state}))


PHASES = [
    {"epochs": 1, "freeze": "backbone", "lr": 0.05},
    {"epochs": 1, "freeze": "stages:3", "lr": 0.02, "layer_decay": 0.5},
    {"epochs": 1, "freeze": "none", "lr": 0.01, "layer_decay": 0.7, "lr_scale": {"stem": 0.1}},
    {"epochs": 1, "freeze": "stages:2", "lr": 0.01},  # freezes again: its optimizer must forget those params
]


@pytest.fixture(scope="module")
def phased_run() -> tuple[TransferClassifier, EpochRecorder]:
    model, recorder = _model(PHASES, momentum=0.9), EpochRecorder()
    _trainer(len(PHASES), [recorder]).fit(model, _loader())
    return model, recorder


def test_frozen_parameters_and_bn_buffers_never_change(phased_run) -> None:
    model, rec = phased_run
    bn_params = {
        f"{n}.": [f"{n}.{p}" for p, _ in m.named_parameters()]
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    for epoch, (start, end, trainable) in enumerate(zip(rec.start, rec.end, rec.trainable, strict=True)):
        frozen_bns = [prefix for prefix, names in bn_params.items() if not trainable.intersection(names)]
        assert frozen_bns or epoch == 2
        for name in start:
            frozen = name in dict(model.named_parameters()) and name not in trainable
            in_frozen_bn = any(name.startswith(p) for p in frozen_bns) and "running" in name
            if frozen or in_frozen_bn:
                assert torch.equal(start[name], end[name]), f"epoch {epoch}: frozen {name} changed"
        changed = {n for n in trainable if not torch.equal(start[n], end[n])}
        assert changed == trainable, f"epoch {epoch}: trainable but unchanged: {sorted(trainable - changed)[:5]}"


def test_each_phase_trains_what_its_spec_says(phased_run) -> None:
    model, rec = phased_run
    stage_of = {f"backbone.{n}": s for s, names in model.backbone.stage_params().items() for n in names}
    trained = [{stage_of[n] for n in names if n in stage_of} for names in rec.trainable]
    assert trained == [set(), set(STAGES[4:]), set(STAGES), set(STAGES[3:])]
    assert all("head.fc.weight" in names for names in rec.trainable)


def test_optimizer_holds_exactly_the_trainable_parameters_and_no_stale_state(phased_run) -> None:
    _, rec = phased_run
    for epoch, (optimised, trainable, state) in enumerate(rec.optimizer_checks):
        assert optimised == trainable, f"epoch {epoch}"
        assert state == trainable, f"epoch {epoch}: optimizer state for params it does not optimise"


def test_group_learning_rates_follow_layer_decay(phased_run) -> None:
    _, rec = phased_run
    for phase, groups in zip(PHASES, rec.groups, strict=True):
        scales = layer_decay_scales(STAGES, phase["layer_decay"]) if "layer_decay" in phase else {}
        for name, lr in groups.items():
            group = name.removesuffix("/no_decay")
            expected = phase["lr"] * scales.get(group, 1.0) * phase.get("lr_scale", {}).get(group, 1.0)
            assert lr == pytest.approx(expected, rel=1e-12), name
    assert set(rec.groups[2]) >= {"head", "stem", "blocks.4.0+"}


def test_layer_decay_scales_formula() -> None:
    scales = layer_decay_scales(["stem", "layer1", "layer2"], 0.5)
    assert scales == {"head": 1.0, "layer2": 0.5, "layer1": 0.25, "stem": 0.125}
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_scales(["stem"], 1.5)


def test_lr_of_every_group_is_logged() -> None:
    model = _model([{"epochs": 1, "freeze": "backbone"}, {"freeze": "stages:4", "layer_decay": 0.5}])
    trainer = _trainer(2, limit_train_batches=1)
    trainer.fit(model, _loader())
    assert {"lr/head", "lr/blocks.4.0+"} <= set(trainer.logged_metrics)
    assert trainer.logged_metrics["lr/blocks.4.0+"].item() == pytest.approx(model.hparams.lr * 0.5)


def test_schedule_restarts_or_continues_per_phase() -> None:
    """Phase 0 restarts a cosine over its 2 epochs with a warmup; phase 1 continues the run-wide cosine."""
    phases = [{"epochs": 2, "freeze": "backbone", "lr": 0.1, "warmup_epochs": 1}, {"lr": 0.05, "restart": False}]
    model = _model(phases, schedule="cosine")
    lrs: list[float] = []

    class Lr(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(4, [Lr()]).fit(model, _loader())  # 2 steps per epoch, 8 steps
    warmup = [0.1 * (0.01 + 0.99 * s / 2) for s in range(2)]
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * t / 2)) for t in range(2)]
    run_wide = [0.05 * 0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(4, 8)]  # no warmup: module's is 0
    assert lrs == pytest.approx(warmup + cosine + run_wide)


def test_train_bn_trains_batchnorm_of_frozen_stages() -> None:
    model, rec = _model([{"freeze": "backbone", "train_bn": True}]), EpochRecorder()
    _trainer(1, [rec]).fit(model, _loader())
    start, end = rec.start[0], rec.end[0]
    bn = "backbone.model.bn1"
    for key in (f"{bn}.weight", f"{bn}.running_mean", f"{bn}.running_var"):
        assert not torch.equal(start[key], end[key]), key
    assert torch.equal(start["backbone.model.conv_stem.weight"], end["backbone.model.conv_stem.weight"])


def test_recalibrate_bn_re_estimates_statistics_before_the_phase() -> None:
    phases = [{"epochs": 1, "freeze": "stages:3"}, {"freeze": "backbone", "recalibrate_bn": True}]
    model, rec, loader = _model(phases), EpochRecorder(), _loader()
    _trainer(2, [rec]).fit(model, loader)
    reference = copy.deepcopy(model.backbone).float()
    reference.load_state_dict({k.removeprefix("backbone."): v for k, v in rec.end[0].items() if "backbone" in k})
    torch.optim.swa_utils.update_bn(loader, reference)  # the same cumulative average, from the same weights
    for name, buf in reference.named_buffers():
        if "running" in name:
            torch.testing.assert_close(rec.start[1][f"backbone.{name}"], buf, msg=name)
            assert torch.equal(rec.start[1][f"backbone.{name}"], rec.end[1][f"backbone.{name}"]), "frozen after"
    assert not torch.equal(
        rec.end[0]["backbone.model.bn1.running_mean"], rec.start[1]["backbone.model.bn1.running_mean"]
    )


def test_recalibrate_bn_on_a_cached_linear_probe_recalibrates_on_images(tmp_path: Path) -> None:
    """A frozen backbone without augmentation trains on cached features; recalibrating needs the images back."""
    dm = ImageDataModule(f"folder:{write_image_folder(tmp_path / 'images')}", image_size=16, batch_size=6,
                         augment="none")  # fmt: skip
    model = _model([{"freeze": "backbone", "recalibrate_bn": True}])
    before = model.backbone.model.bn1.running_mean.clone()
    tiny_trainer(tmp_path).fit(model, dm)
    assert not torch.equal(before, model.backbone.model.bn1.running_mean)


def test_resume_after_and_before_the_phase_change_ends_with_the_same_weights(tmp_path: Path) -> None:
    phases = [
        {"epochs": 1, "freeze": "backbone", "lr": 0.05},
        {"freeze": "stages:2", "layer_decay": 0.7, "restart": False},
    ]
    kwargs = dict(momentum=0.9, schedule="cosine", lr=0.02)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(tmp_path, filename="{epoch}", save_top_k=-1)
    full = _model(phases, **kwargs)
    _trainer(3, [checkpoints], enable_checkpointing=True).fit(full, _loader())
    for epoch in (0, 1):  # 0: taken before the phase change; 1: after it
        resumed = _model(phases, **kwargs)
        _trainer(3, enable_checkpointing=True, default_root_dir=tmp_path).fit(
            resumed, _loader(), ckpt_path=tmp_path / f"epoch={epoch}.ckpt"
        )
        for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"resumed from epoch {epoch}: {name} differs"
    checkpoint = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)
    state = checkpoint["callbacks"]["FineTuningPhases"]
    assert state["phase"] == 1 and "backbone.model.conv_stem.weight" in state["frozen"]
    assert [phase["freeze"] for phase in state["phases"]] == ["backbone", "stages:2"]

    # A checkpoint of the format before the callback saved its phases (index, entered, frozen) resumes the same run.
    del state["phases"]
    torch.save(checkpoint, tmp_path / "old-format.ckpt")
    resumed = _model(phases, **kwargs)
    _trainer(3).fit(resumed, _loader(), ckpt_path=tmp_path / "old-format.ckpt")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"resumed from an old-format checkpoint: {name} differs"

    other = [{**phases[0], "lr": 0.5}, phases[1]]
    with pytest.raises(ValueError, match="other phases"):  # a resumed run must be the run that wrote the checkpoint
        _trainer(3).fit(_model(other, **kwargs), _loader(), ckpt_path=tmp_path / "epoch=1.ckpt")


def test_compiled_run_trains_unfrozen_layers_and_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    # aot_eager runs the same dynamo capture and AOTAutograd graphs as inductor (where a stale requires_grad set
    # bites) without inductor's C++ compile, which would blow the test-time budget on 2 CPU cores.
    original = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: original(self, backend="aot_eager", **kw))
    phases = [{"epochs": 1, "freeze": "backbone", "lr": 0.05}, {"freeze": "none", "lr": 0.02}]
    losses: dict[bool, list[float]] = {}
    recorders = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model, recorders[compiled] = _model(phases, compile=compiled), EpochRecorder()
        losses[compiled] = []

        class Loss(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, store=losses[compiled]):
                store.append(outputs["loss"].item())

        _trainer(2, [recorders[compiled], Loss()]).fit(model, _loader())
    rec = recorders[True]
    stem = "backbone.model.conv_stem.weight"
    assert torch.equal(rec.start[0][stem], rec.end[0][stem]) and not torch.equal(rec.start[1][stem], rec.end[1][stem])
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)


def test_freeze_epochs_shorthand_expands_to_two_phases() -> None:
    model = TransferClassifier(BN_MODEL, num_classes=3, freeze_epochs=2, layer_decay=0.8, lr=0.03)
    callbacks = model.configure_callbacks()
    assert [type(c) for c in callbacks] == [RngStateCheckpoint, PairingCheck, FineTuningPhases]
    phases = callbacks[2]
    assert [(p.epochs, p.freeze, p.layer_decay, p.lr) for p in phases.phases] == [
        (2, "backbone", 0.8, 0.03),
        (None, "none", 0.8, 0.03),
    ]
    assert not any(p.requires_grad for p in model.backbone.parameters())  # the model starts in the first phase
    assert [phases.index_at(e) for e in range(4)] == [0, 0, 1, 1]
    assert [phases.epochs_of(i, max_epochs=5) for i in (0, 1)] == [(0, 2), (2, 5)]
    one_phase = TransferClassifier(BN_MODEL, num_classes=3).configure_callbacks()
    assert [type(c) for c in one_phase] == [RngStateCheckpoint, PairingCheck]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(phases=[{"epochs": 1, "frezee": "backbone"}]), "unknown keys"),
        (dict(phases=[{"freeze": "backbone"}, {"epochs": 1}]), "only the last phase"),
        (dict(phases=[{"epochs": 1}, {"freeze": "stages:99"}]), "stages:99"),
        (dict(phases=[{"lr_scale": {"layer9": 0.1}}]), "unknown groups"),
        (dict(phases=[{"epochs": 1}], freeze_epochs=1), "not both"),
    ],
)
def test_bad_phases_fail_with_a_clear_message(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransferClassifier(BN_MODEL, num_classes=3, **kwargs)


def test_warmup_longer_than_its_phase_is_clamped_with_a_warning() -> None:
    model = _model([{"epochs": 1, "freeze": "backbone", "warmup_epochs": 1}, {"freeze": "none"}])
    with pytest.warns(UserWarning, match="covers the whole phase 0"):
        _trainer(2, limit_train_batches=1).fit(model, _loader())
    assert model.phase_index == 1 and model.phase.freeze == "none"


def test_parse_phases_inherits_module_values() -> None:
    phases = parse_phases([{"epochs": 1}, {"lr": 0.5}], {"freeze": "stages:1", "lr": 0.1, "warmup_epochs": 0.5})
    assert (phases[0].freeze, phases[0].lr, phases[1].lr, phases[1].warmup_epochs) == ("stages:1", 0.1, 0.5, 0.5)


def test_phased_recipe_runs_from_the_command_line(tmp_path: Path) -> None:
    """recipes/phased.yaml, shortened to 2 epochs of 1 batch: its phases parse from YAML, switch, and are logged."""
    from tlkit.cli import main

    recipe = Path(__file__).parents[1] / "recipes" / "phased.yaml"
    overrides = dict(max_epochs=2, limit_train_batches=1, limit_val_batches=1, log_every_n_steps=1)
    main(
        ["fit", "--config", str(recipe), "--data.init_args.num_workers", "0"]
        + ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
        + [arg for key, value in overrides.items() for arg in (f"--trainer.{key}", str(value))]
    )
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [row for row in csv.DictReader(f) if row["lr/head"]]
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert [bool(row["lr/blocks.6+"]) for row in rows] == [False, True]  # phase 1: last two stages
    assert not any(row.get("lr/blocks.4") for row in rows)
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert checkpoint["hyper_parameters"]["phases"][1]["freeze"] == "stages:5"
    assert "FineTuningPhases" in checkpoint["callbacks"]
