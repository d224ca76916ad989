"""ResNet-18 for DP-SGD: torchvision's architecture with GroupNorm and no in-place operations.

Kept apart from :mod:`fedpriv.models` so that importing fedpriv does not import torchvision's model
zoo (about 1.5 s per process: the CLI, the ServerApp and every simulated hospital's worker).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock


class _HookSafeBasicBlock(BasicBlock):
    """torchvision's BasicBlock without in-place operations (same parameters, same state_dict keys).

    Opacus wraps each layer's output for its backward hooks; torchvision's in-place ReLU and
    `out += identity` then modify such an output in place, which autograd forbids ("Output 0 of
    BackwardHookFunction is a view and is being modified inplace"), so DP-SGD could not run at all.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def resnet18_greyscale(in_channels: int = 1, num_classes: int = 2, image_size: int = 28, *,
                       groups: Callable[[int], int]) -> nn.Module:
    """torchvision's ResNet-18 with GroupNorm, a `in_channels` stem, and no pretrained weights.

    `groups(channels)` is the number of GroupNorm groups for a layer of `channels` (fedpriv.models
    passes its rule, so that this module imports nothing of fedpriv's).

    For small images (< 64 px) the stem is a 3x3 stride-1 convolution without max-pooling, so
    28x28 inputs keep enough spatial resolution (as in MedMNIST's own ResNet baselines).
    No operation is in place (see :class:`_HookSafeBasicBlock`), so Opacus's hooks can wrap it.
    """
    model = ResNet(_HookSafeBasicBlock, [2, 2, 2, 2], num_classes=num_classes,
                   norm_layer=lambda c: nn.GroupNorm(groups(c), c))
    model.relu = nn.ReLU()
    if image_size < 64:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model
