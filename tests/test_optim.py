"""Tests for tlkit.optim."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import lightning as L
import pytest
import timm
import torch
from conftest import tiny_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tlkit.module
from tlkit import TransferClassifier
from tlkit.optim import (
    OPTIMIZERS,
    SCHEDULES,
    create_lbfgs,
    create_optimizer,
    create_scheduler,
    excluded_from_weight_decay,
    l1_penalty,
    l2_penalty,
    no_weight_decay_names,
    param_groups,
    uses_weight_decay,
)

LR = 0.1
TOTAL, WARMUP = 50, 5
T = TOTAL - WARMUP


def _tiny_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),  # "0": stem
        nn.BatchNorm2d(4),  # "1"
        nn.Flatten(),
        nn.LayerNorm(4),  # "3": head
        nn.Linear(4, 2),  # "4"
    )


def _group_of(name: str) -> str:
    return "stem" if name.split(".")[0] in {"0", "1"} else "head"


CLOSED_FORMS: dict[str, Callable[[int], float]] = {
    "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t / T)),
    "linear": lambda t: 1 - t / T,
    "step": lambda t: 0.1 ** (t // (T // 3)),
    "constant": lambda t: 1.0,
}


def _run_schedule(name: str, scales: dict[str, float], **kwargs) -> list[list[float]]:
    """Steps optimizer + scheduler for TOTAL steps; returns each group's LR as used at every step."""
    groups = param_groups(
        _tiny_model().named_parameters(), weight_decay=0.0, base_lr=LR, group_of=_group_of, lr_scale=scales
    )
    optimizer = create_optimizer(groups, "sgd", lr=LR)
    scheduler = create_scheduler(optimizer, name, total_steps=TOTAL, warmup_steps=WARMUP, **kwargs)
    history = []
    for _ in range(TOTAL):
        lrs = [group["lr"] for group in optimizer.param_groups]
        assert lrs == pytest.approx(scheduler.get_last_lr())
        history.append(lrs)
        optimizer.step()
        scheduler.step()
    return history


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_closed_form_after_warmup(name: str) -> None:
    scales = {"stem": 0.1, "head": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SequentialLR/LinearLR must not warn in normal use
        history = _run_schedule(name, scales)
    group_scales = [scales["stem"]] * 2 + [scales["head"]] * 2  # stem, stem/no_decay, head, head/no_decay
    for step, lrs in enumerate(history[WARMUP:]):
        expected = [LR * s * CLOSED_FORMS[name](step) for s in group_scales]
        assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12), f"{name} t={step}"


@pytest.mark.parametrize("name", SCHEDULES)
def test_warmup_rises_linearly_to_lr(name: str) -> None:
    start = 0.01
    history = _run_schedule(name, {"stem": 0.5}, warmup_start_factor=start)
    for step in range(WARMUP + 1):
        factor = start + (1 - start) * step / WARMUP
        assert history[step] == pytest.approx([LR * 0.5 * factor] * 2 + [LR * factor] * 2), f"step {step}"


def test_min_lr_factor_floors_cosine_and_linear() -> None:
    for name in ("cosine", "linear"):
        history = _run_schedule(name, {}, min_lr_factor=0.2)
        assert history[WARMUP][0] == pytest.approx(LR)
        assert history[-1][0] == pytest.approx(LR * (0.2 + 0.8 * CLOSED_FORMS[name](T - 1)))


def test_no_warmup_returns_main_schedule() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=LR)
    scheduler = create_scheduler(optimizer, "step", total_steps=9, step_size=2, gamma=0.5)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert scheduler.step_size == 2


def test_scheduler_validation() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=LR)
    with pytest.raises(ValueError, match="warmup_steps"):
        create_scheduler(optimizer, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError) as err:
        create_scheduler(optimizer, "poly", total_steps=10)
    assert "poly" in str(err.value) and all(name in str(err.value) for name in SCHEDULES)


def test_param_groups_split_decay_and_skip_frozen() -> None:
    model = _tiny_model()
    model[0].bias.requires_grad_(False)
    groups = param_groups(
        model.named_parameters(), weight_decay=0.05, base_lr=LR, group_of=_group_of, lr_scale={"head": 10.0}
    )
    by_name = {group["name"]: group for group in groups}
    assert list(by_name) == ["stem", "stem/no_decay", "head/no_decay", "head"]  # order of first appearance

    def ids(group: dict) -> set[int]:
        return {id(p) for p in group["params"]}

    assert ids(by_name["stem"]) == {id(model[0].weight)}
    assert ids(by_name["stem/no_decay"]) == {id(model[1].weight), id(model[1].bias)}
    assert ids(by_name["head"]) == {id(model[4].weight)}
    assert ids(by_name["head/no_decay"]) == {id(model[3].weight), id(model[3].bias), id(model[4].bias)}
    assert all(id(model[0].bias) not in ids(group) for group in groups)
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0, 0.0, 0.05]
    assert [group["lr"] for group in groups] == pytest.approx([LR, LR, 10 * LR, 10 * LR])
    assert [group["lr_scale"] for group in groups] == [1.0, 1.0, 10.0, 10.0]


def test_param_groups_default_single_group_from_dict() -> None:
    model = _tiny_model()
    groups = param_groups(dict(model.named_parameters()), weight_decay=0.1, base_lr=LR)
    assert [group["name"] for group in groups] == ["all", "all/no_decay"]
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("name", "cls", "expected"),
    [
        ("sgd", torch.optim.SGD, {"momentum": 0.8, "nesterov": True}),
        ("adam", torch.optim.Adam, {"betas": (0.8, 0.99), "eps": 1e-6}),
        ("adamw", torch.optim.AdamW, {"betas": (0.8, 0.99), "eps": 1e-6}),
        ("rmsprop", torch.optim.RMSprop, {"momentum": 0.8, "eps": 1e-6}),
    ],
)
def test_create_optimizer_builds_class_with_hparams(name: str, cls: type, expected: dict) -> None:
    assert name in OPTIMIZERS
    groups = param_groups(_tiny_model().named_parameters(), weight_decay=0.05, base_lr=0.01, group_of=_group_of)
    kwargs = {"momentum": 0.8, "betas": (0.8, 0.99), "eps": 1e-6, "nesterov": name == "sgd"}
    optimizer = create_optimizer(groups, name, lr=0.5, **kwargs)
    assert type(optimizer) is cls
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.01)  # group lr wins over the default
        assert {key: group[key] for key in expected} == expected
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.05, 0.0, 0.0, 0.05]


def test_create_optimizer_errors() -> None:
    params = [{"params": [nn.Parameter(torch.zeros(2))]}]
    with pytest.raises(ValueError) as err:
        create_optimizer(params, "lamb", lr=0.1)
    assert "lamb" in str(err.value) and all(name in str(err.value) for name in OPTIMIZERS)
    with pytest.raises(ValueError, match="nesterov"):
        create_optimizer(params, "adam", lr=0.1, nesterov=True)


def test_l1_penalty_on_decayed_params() -> None:
    model = _tiny_model()
    decayed = [p for p in model.parameters() if uses_weight_decay(p)]
    expected = sum(p.abs().sum() for p in decayed)
    torch.testing.assert_close(l1_penalty(decayed), expected)
    assert l1_penalty([]).item() == 0.0


def test_lbfgs_is_the_probes_own_optimizer_not_a_fine_tuning_choice() -> None:
    head = nn.Linear(4, 3)
    optimizer = create_lbfgs(head.parameters(), lr=0.5, max_iter=7)
    (group,) = optimizer.param_groups
    assert type(optimizer) is torch.optim.LBFGS and group["line_search_fn"] == "strong_wolfe"
    assert (group["lr"], group["max_iter"]) == (0.5, 7)
    assert group["history_size"] == 10  # scikit-learn's and SciPy's memory, not torch's 100 vectors
    assert "lbfgs" not in OPTIMIZERS
    with pytest.raises(ValueError, match="Unknown optimizer 'lbfgs'"):
        create_optimizer([{"params": list(head.parameters())}], "lbfgs", lr=0.1)


def test_l2_penalty_has_the_gradient_of_weight_decay() -> None:
    decayed = [p for p in _tiny_model().parameters() if uses_weight_decay(p)]
    l2_penalty(decayed).backward()
    for param in decayed:
        torch.testing.assert_close(param.grad, param.detach())  # d/dw (|w|^2 / 2) = w, SGD's weight-decay term
    assert l2_penalty([]).item() == 0.0


def _decay_of(groups: list[dict], model: nn.Module, prefix: str = "") -> dict[str, float]:
    """Each trainable parameter's name -> the weight decay of the group it landed in."""
    decay_of_id = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    return {prefix + n: decay_of_id[id(p)] for n, p in model.named_parameters() if id(p) in decay_of_id}


def test_param_groups_leave_out_what_a_timm_vit_names_in_no_weight_decay() -> None:
    vit = timm.create_model("test_vit")
    names = no_weight_decay_names(vit)
    assert {"cls_token", "pos_embed"} <= names
    groups = param_groups(vit.named_parameters(), weight_decay=0.05, base_lr=LR, no_weight_decay=names)
    decay = _decay_of(groups, vit)
    assert decay["cls_token"] == decay["pos_embed"] == 0.0  # 2-D and 3-D tensors: ndim alone would decay them
    assert decay["blocks.0.attn.qkv.weight"] == decay["patch_embed.proj.weight"] == 0.05
    without = param_groups(vit.named_parameters(), weight_decay=0.05, base_lr=LR)
    assert _decay_of(without, vit)["pos_embed"] == 0.05  # what the argument changes


def test_no_weight_decay_names_leave_a_cnn_unchanged() -> None:
    cnn = timm.create_model("test_efficientnet")
    assert no_weight_decay_names(cnn, "backbone.model.") == frozenset()
    assert no_weight_decay_names(_tiny_model()) == frozenset()  # a torch module without the method
    ours = param_groups(
        cnn.named_parameters(), weight_decay=0.05, base_lr=LR, no_weight_decay=no_weight_decay_names(cnn)
    )
    plain = param_groups(cnn.named_parameters(), weight_decay=0.05, base_lr=LR)
    assert [(g["name"], list(map(id, g["params"]))) for g in ours] == [
        (g["name"], list(map(id, g["params"]))) for g in plain
    ]


@pytest.mark.parametrize(
    ("name", "entry", "excluded"),
    [
        ("m.pos_embed", "m.pos_embed", True),  # a parameter name
        ("m.pos_embed_x", "m.pos_embed", False),  # not a prefix of a longer name
        ("m.pos_block.0.proj.weight", "m.pos_block.0", True),  # a module name: all its parameters
        ("m.pos_embed.token_projection.weight", "m.pos_embed.*", True),  # xcit's wildcard
        ("m.blocks.0.attn.relative_position_bias_table", "*relative_position_bias_table", True),
        ("m.blocks.0.attn.qkv.weight", "*relative_position_bias_table", False),
    ],
)
def test_excluded_from_weight_decay_matches_names_modules_and_patterns(name: str, entry: str, excluded: bool) -> None:
    assert excluded_from_weight_decay(name, {entry}) is excluded


class _GroupRecorder(L.Callback):
    """The optimizer's weight decay per parameter name, at the first batch of every epoch (every phase)."""

    def __init__(self) -> None:
        self.decay: list[dict[str, float]] = []
        self.lr: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            groups = trainer.optimizers[0].param_groups
            self.decay.append(_decay_of(groups, pl_module))
            self.lr.append({g["name"]: g["lr"] for g in groups})


def _vit_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(4, 3, 160, 160, generator=g), torch.tensor([0, 1, 0, 1])), batch_size=2)


@pytest.mark.usefixtures("one_thread")
def test_vit_tokens_get_no_weight_decay_in_every_phase_and_with_layer_decay(tmp_path, monkeypatch) -> None:
    phases = [
        {"epochs": 1, "freeze": "stages:6", "lr": 0.01},  # stem (the tokens) frozen: not in the optimizer
        {"epochs": 1, "freeze": "none", "lr": 0.01, "layer_decay": 0.5},
    ]
    model = TransferClassifier("test_vit", num_classes=2, weight_decay=0.05, l1=1e-3, phases=phases)
    recorder, l1_params = _GroupRecorder(), []
    monkeypatch.setattr(tlkit.module, "l1_penalty", lambda params: l1_params.append(params) or l1_penalty(params))
    tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[recorder]).fit(model, _vit_loader())
    tokens = ("backbone.model.cls_token", "backbone.model.pos_embed")
    assert not set(tokens) & set(recorder.decay[0])
    assert [recorder.decay[1][name] for name in tokens] == [0.0, 0.0]
    assert recorder.decay[1]["backbone.model.blocks.0.attn.qkv.weight"] == 0.05
    assert recorder.lr[1]["stem/no_decay"] == pytest.approx(0.01 * 0.5**7)  # the tokens keep their stage's LR
    penalised = {id(p) for params in l1_params for p in params}
    penalised_names = {name for name, p in model.named_parameters() if id(p) in penalised}
    assert "backbone.model.blocks.0.attn.qkv.weight" in penalised_names
    assert not set(tokens) & penalised_names  # nor an L1 penalty
