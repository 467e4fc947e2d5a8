"""Tests for tlkit.heads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tlkit.heads import ACTIVATIONS, INITS, ClassifierHead, resolve_init


def _linears(head: ClassifierHead) -> list[nn.Linear]:
    return [m for m in head.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize(("activation", "gain"), [("relu", 2.0), ("tanh", 1.0)])
def test_wide_layer_std_matches_formula(activation: str, gain: float) -> None:
    torch.manual_seed(0)
    head = ClassifierHead(4096, 10, hidden=(4096,), activation=activation)
    expected = math.sqrt(gain / 4096)
    for layer in _linears(head):  # hidden 4096->4096 and logits 4096->10 share the rule
        assert layer.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert layer.weight.mean().item() == pytest.approx(0.0, abs=0.05 * expected)


def test_biases_start_at_zero() -> None:
    head = ClassifierHead(32, 5, hidden=(16, 8), activation="gelu")
    for layer in _linears(head):
        assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_auto_init_picks_rule_per_activation(activation: str) -> None:
    expected = "xavier" if activation == "tanh" else "kaiming"
    assert resolve_init("auto", activation) == expected
    assert ClassifierHead(8, 2, activation=activation).init_rule == expected


def test_explicit_init_overrides_auto() -> None:
    torch.manual_seed(0)
    head = ClassifierHead(2048, 512, activation="relu", init="xavier")
    assert head.fc.weight.std().item() == pytest.approx(math.sqrt(1 / 2048), rel=0.05)


@pytest.mark.parametrize("hidden", [(), (64,), (64, 32)])
def test_output_shapes(hidden: tuple[int, ...]) -> None:
    head = ClassifierHead(128, 7, hidden=hidden)
    x = torch.randn(4, 128)
    assert head(x).shape == (4, 7)
    assert head.pre_logits(x).shape == (4, hidden[-1] if hidden else 128)
    assert len(_linears(head)) == len(hidden) + 1


def test_layer_order_with_hidden_and_dropout() -> None:
    head = ClassifierHead(16, 3, hidden=(8,), dropout=0.2, activation="elu")
    kinds = [type(m) for m in head.body] + [type(head.fc)]
    assert kinds == [nn.Linear, nn.ELU, nn.Dropout, nn.Dropout, nn.Linear]
    assert all(m.p == 0.2 for m in head.modules() if isinstance(m, nn.Dropout))


def test_no_dropout_when_zero() -> None:
    head = ClassifierHead(16, 3, hidden=(8,), dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in head.modules())


def test_pre_logits_feeds_fc() -> None:
    head = ClassifierHead(16, 3, hidden=(8,), dropout=0.5).eval()
    x = torch.randn(2, 16)
    torch.testing.assert_close(head(x), head.fc(head.pre_logits(x)))


@pytest.mark.parametrize(
    ("kwargs", "bad", "valid"),
    [({"activation": "swishy"}, "swishy", ACTIVATIONS), ({"init": "orthogonal"}, "orthogonal", INITS)],
)
def test_bad_choice_error_lists_options(kwargs: dict, bad: str, valid: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as err:
        ClassifierHead(8, 2, **kwargs)
    message = str(err.value)
    assert bad in message
    assert all(option in message for option in valid)
