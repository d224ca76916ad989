"""Opacus-compatible image classifiers.

DP-SGD needs per-sample gradients, which BatchNorm breaks (it mixes samples in a batch), so every
model here normalises with GroupNorm. :func:`build_model` checks the result with Opacus's
ModuleValidator and turns its findings into a :class:`ModelNotPrivateError` with Opacus's own words.
"""

from __future__ import annotations

import sys

from torch import nn

from fedpriv.errors import ConfigError, ModelNotPrivateError

# Activations the CNN can use. tanh is the default: under DP-SGD every per-sample gradient is clipped,
# and a bounded activation keeps activations (and so gradient norms) from growing round after round,
# so less of the signal is lost to clipping (Papernot et al., "Tempered Sigmoid Activations for Deep
# Learning with Differential Privacy", AAAI 2021). Measured here: see BENCHMARKS.md, accuracy.
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class SmallCNN(nn.Module):
    """Three conv blocks (GroupNorm, activation) and a linear head: ~25k parameters at width 16."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 16,
                 activation: str = "tanh") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError("model.activation", activation, f"unknown activation; known: {', '.join(ACTIVATIONS)}",
                              "set model.activation=tanh (or relu)")
        channels = [in_channels, width, width * 2, width * 4]
        blocks: list[nn.Module] = []
        for index, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(_groups(c_out), c_out),
                       ACTIVATIONS[activation]()]
            # Pool after the first two blocks; the last block is pooled globally so any size works.
            blocks.append(nn.MaxPool2d(2) if index < 2 else nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, images):
        return self.head(self.features(images).flatten(1))


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 8 channels a group keeps statistics stable for small widths."""
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0 and channels // groups >= 2:
            return groups
    return 1


def check_private_trainable(model: nn.Module) -> None:
    """Raise :class:`ModelNotPrivateError` with Opacus's explanation if DP-SGD cannot train `model`."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        reasons = "; ".join(sorted({str(p) for p in problems}))
        raise ModelNotPrivateError(
            f"{type(model).__name__} cannot be trained with DP-SGD: {reasons}. "
            "Fix: replace those layers (e.g. BatchNorm by GroupNorm), or use ModuleValidator.fix(model)"
        )


# Opacus grad-sample mode used for each model when a plan says "auto" (the default): the fastest
# correct one on the 2-core CPU, measured with bench/dp_overhead.py (see BENCHMARKS.md, DP overhead).
# Correct: "functorch" and "ew" fail on an empty Poisson batch with these GroupNorm models, so only
# "hooks" and "ghost" qualify. Fastest: ghost clipping was slower than hooks for both models (about
# 1.15-1.25x the time for the CNN, 1.1-1.3x for ResNet-18), because Opacus has norm samplers only
# for Linear/Embedding layers, so convolutions still build per-sample gradients, and ghost adds a
# second backward pass. Ghost does halve ResNet-18's training memory (per-sample gradients are
# dropped layer by layer): choose it explicitly (grad_sample_mode="ghost") where memory limits.
GRAD_SAMPLE_MODE_BY_MODEL = {"cnn": "hooks", "resnet18": "hooks", "scatnet": "hooks"}


def model_name(model: nn.Module) -> str | None:
    """The :func:`build_model` name of `model` ("cnn", "resnet18", "scatnet"), or None for any other module."""
    if isinstance(model, SmallCNN):
        return "cnn"
    scatnet = sys.modules.get("fedpriv.scatnet")  # not imported: `model` cannot be a ScatNet
    if scatnet is not None and isinstance(model, scatnet.ScatNet):
        return "scatnet"
    # Without torchvision imported, `model` cannot be a torchvision ResNet (and we avoid importing it).
    torchvision_models = sys.modules.get("torchvision.models")
    if torchvision_models is not None and isinstance(model, torchvision_models.ResNet):
        return "resnet18"
    return None


def resolve_grad_sample_mode(mode: str, model: nn.Module) -> str:
    """The Opacus grad-sample mode to train `model` with: `mode` itself, or for "auto" the measured
    choice for this model (Opacus's default "hooks" for models not measured)."""
    if mode != "auto":
        return mode
    return GRAD_SAMPLE_MODE_BY_MODEL.get(model_name(model), "hooks")


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int, width: int = 16,
                activation: str = "tanh", scale: int | None = None, orientations: int = 8,
                order: int = 2) -> nn.Module:
    """The model called `name` ("cnn", "resnet18" or "scatnet"), checked to be trainable with DP-SGD.

    `width` and `activation` shape the CNN and ScatNet's head; ResNet-18 keeps torchvision's ReLU and
    widths. `scale` (J, None: by image size), `orientations` (L) and `order` fix ScatNet's front end.
    """
    if name == "cnn":
        model = SmallCNN(in_channels, num_classes, width, activation)
    elif name == "resnet18":
        from fedpriv.resnet import resnet18_greyscale  # deferred: torchvision's model zoo takes ~1.5 s to import

        model = resnet18_greyscale(in_channels, num_classes, image_size, groups=_groups)
    elif name == "scatnet":
        from fedpriv.scatnet import ScatNet  # deferred: only this model needs kymatio

        if activation not in ACTIVATIONS:
            raise ConfigError("model.activation", activation, f"unknown activation; known: {', '.join(ACTIVATIONS)}",
                              "set model.activation=tanh (or relu)")
        model = ScatNet(in_channels, num_classes, image_size, scale=scale, orientations=orientations, order=order,
                        width=width, activation=ACTIVATIONS[activation])
    else:
        raise ConfigError("model.name", name, "unknown model; known: cnn, resnet18, scatnet",
                          "set model=cnn, model=resnet18 or model=scatnet")
    check_private_trainable(model)
    return model
