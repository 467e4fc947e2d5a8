"""Classification heads placed on top of pooled backbone features."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

_ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "tanh": nn.Tanh,
}
ACTIVATIONS: tuple[str, ...] = tuple(_ACTIVATION_MODULES)
INITS: tuple[str, ...] = ("auto", "kaiming", "xavier")

# Activations that are not zero-centred (ReLU-like) lose about half the signal variance per layer,
# so they need the gain of 2; symmetric ones (tanh) keep it and use gain 1.
_KAIMING_ACTIVATIONS = frozenset({"relu", "leaky_relu", "gelu", "elu", "selu"})


def _check_choice(kind: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"Unknown {kind} {value!r}; valid options: {', '.join(valid)}")


def resolve_init(init: str, activation: str) -> str:
    """Resolves ``init="auto"`` to the concrete rule for ``activation``.

    Args:
        init: One of ``INITS``.
        activation: One of ``ACTIVATIONS``.

    Returns:
        ``"kaiming"`` or ``"xavier"``.
    """
    _check_choice("init", init, INITS)
    _check_choice("activation", activation, ACTIVATIONS)
    if init != "auto":
        return init
    return "kaiming" if activation in _KAIMING_ACTIVATIONS else "xavier"


def _init_linear(layer: nn.Linear, rule: str) -> None:
    # kaiming_normal_ with mode="fan_in" draws N(0, gain / sqrt(fan_in)); gain is sqrt(2) for "relu", 1 for "linear".
    nonlinearity = "relu" if rule == "kaiming" else "linear"
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity=nonlinearity)
    nn.init.zeros_(layer.bias)


class ClassifierHead(nn.Module):
    """MLP classifier mapping pooled features ``(N, in_features)`` to logits ``(N, num_classes)``.

    Layout: for each width in ``hidden``: ``Linear -> activation -> Dropout``; then ``Dropout -> Linear(num_classes)``.
    Dropout layers are only added when ``dropout > 0``.

    Weight init (biases always start at zero), with ``fan_in`` the layer's input width:

    - ``"kaiming"``: ``W ~ N(0, std=sqrt(2 / fan_in))``.
    - ``"xavier"``: ``W ~ N(0, std=sqrt(1 / fan_in))``. Note: this is the project's definition (fan-in only,
      a.k.a. LeCun normal), not torch's ``xavier_normal_`` which uses ``sqrt(2 / (fan_in + fan_out))``.
    - ``"auto"``: ``"kaiming"`` for the ReLU family (relu, leaky_relu, gelu, elu, selu), ``"xavier"`` for tanh.

    The final (logit) layer uses the same rule as the hidden layers.

    Args:
        in_features: Width of the pooled backbone features.
        num_classes: Number of output logits.
        hidden: Widths of the hidden layers; empty for a linear head.
        dropout: Dropout probability; 0 disables dropout.
        activation: One of ``ACTIVATIONS``.
        init: One of ``INITS``.

    Raises:
        ValueError: If ``activation`` or ``init`` is unknown.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        activation: str = "relu",
        init: str = "auto",
    ) -> None:
        super().__init__()
        self.init_rule = resolve_init(init, activation)
        layers: list[nn.Module] = []
        width = in_features
        for out in hidden:
            layers += [nn.Linear(width, out), _ACTIVATION_MODULES[activation]()]
            layers += self._dropout(dropout)
            width = out
        layers += self._dropout(dropout)
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        self.reset_parameters()

    @staticmethod
    def _dropout(p: float) -> list[nn.Module]:
        return [nn.Dropout(p)] if p > 0 else []

    def reset_parameters(self) -> None:
        """Re-initialises every Linear layer with the head's init rule."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module, self.init_rule)

    def pre_logits(self, x: Tensor) -> Tensor:
        """Returns the features fed to the final Linear (after the hidden layers and dropout)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Maps pooled features ``(N, in_features)`` to logits ``(N, num_classes)``."""
        return self.fc(self.pre_logits(x))


__all__ = ["ACTIVATIONS", "INITS", "ClassifierHead", "resolve_init"]
