"""Tests for tlkit.optim."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from tlkit.optim import (
    OPTIMIZERS,
    SCHEDULES,
    create_optimizer,
    create_scheduler,
    l1_penalty,
    l2_penalty,
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


def test_lbfgs_merges_the_groups_into_one_and_needs_one_lr() -> None:
    model = _tiny_model()
    groups = param_groups(model.named_parameters(), weight_decay=0.05, base_lr=0.01, group_of=_group_of)
    optimizer = create_optimizer(groups, "lbfgs", lr=0.5)
    assert type(optimizer) is torch.optim.LBFGS and len(optimizer.param_groups) == 1  # torch's LBFGS takes one
    (group,) = optimizer.param_groups
    assert list(map(id, group["params"])) == [id(p) for g in groups for p in g["params"]]
    assert len(group["params"]) == len(list(model.parameters()))
    assert group["lr"] == pytest.approx(0.01) and group["name"] == "all" and group["line_search_fn"] == "strong_wolfe"
    assert group["history_size"] == 10  # scikit-learn's and SciPy's memory, not torch's 100 vectors
    head_only = [g for g in groups if g["name"].startswith("head")]
    assert create_optimizer(head_only, "lbfgs", lr=0.01).param_groups[0]["name"] == "head"
    scaled = param_groups(
        model.named_parameters(), weight_decay=0.05, base_lr=0.01, group_of=_group_of, lr_scale={"head": 10.0}
    )
    with pytest.raises(ValueError, match="one learning rate") as err:
        create_optimizer(scaled, "lbfgs", lr=0.01)
    assert "0.01 (stem)" in str(err.value) and "0.1 (head)" in str(err.value)


def test_l2_penalty_has_the_gradient_of_weight_decay() -> None:
    decayed = [p for p in _tiny_model().parameters() if uses_weight_decay(p)]
    l2_penalty(decayed).backward()
    for param in decayed:
        torch.testing.assert_close(param.grad, param.detach())  # d/dw (|w|^2 / 2) = w, SGD's weight-decay term
    assert l2_penalty([]).item() == 0.0
