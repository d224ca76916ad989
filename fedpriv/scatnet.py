"""A fixed wavelet-scattering front end with a small trainable head (``model=scatnet``).

DP-SGD pays for every trainable parameter with noise, so private models do best on good features
that cost no privacy (Tramèr and Boneh, "Differentially Private Learning Needs Better Features (or
Much More Data)", ICLR 2021). A wavelet scattering transform (Mallat 2012; Bruna and Mallat 2013),
here kymatio's, is such a feature extractor: Morlet filters fixed in advance by the scale J, the
number of orientations L and the order.

**Data-independence.** The front end learns nothing and estimates nothing: its filters depend only
on (J, L, order, image size), never on any hospital's data, and it has no parameters and no state
that training or data could change (its filters are non-persistent buffers, so they are not even
part of the weights a hospital sends). All normalisation after it is per sample: GroupNorm, which
keeps no running statistics, with its affine weights trained under DP-SGD like the rest of the head.
No mean or variance of any hospital's data enters the model.

**Computed once.** Because the front end is fixed, a hospital turns its images into scattering
coefficients once per run (:func:`precomputed`, called where the hospital's site is assembled), and
training runs the head alone. :meth:`ScatNet.forward` takes either images ``(N, C, H, W)`` or their
coefficients ``(N, C*K, H', W')`` (K coefficients per channel), so the server, the report and
``fedpriv-predict`` use the same weights on raw images.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from fedpriv.data import LabeledImages
from fedpriv.errors import ConfigError

# Spatial side of the coefficients the automatic scale aims for: 28x28 MedMNIST images at J=2 give
# 7x7, the setting the accuracy targets were measured with; larger images get a larger J, so the
# head (and the coefficients a hospital keeps in memory) stay about as small at every image size.
TARGET_SIDE = 7
PRECOMPUTE_BATCH = 256  # images per scattering call when precomputing: bounds peak memory


def auto_scale(image_size: int) -> int:
    """The scale J for `image_size` when none is configured: the largest J >= 1 whose coefficients are
    at least 7 pixels wide (28 -> 2, 64 -> 3, 128 -> 4, 224 -> 5; 1 below 28 pixels)."""
    return max(1, math.floor(math.log2(image_size / TARGET_SIDE)))


def coefficients_per_channel(scale: int, orientations: int, order: int) -> int:
    """K: scattering coefficients per input channel (order 0, plus J*L of order 1, plus L^2 J(J-1)/2 of order 2)."""
    first = scale * orientations
    second = orientations**2 * scale * (scale - 1) // 2 if order == 2 else 0
    return 1 + first + second


def scattering_maps(scale: int | None, orientations: int, order: int, image_size: int) -> int:
    """K for these model settings (scale None: :func:`auto_scale` of `image_size`)."""
    return coefficients_per_channel(auto_scale(image_size) if scale is None else scale, orientations, order)


def _group_count(channels: int) -> int:
    """GroupNorm groups for `channels` coefficient maps: groups of the smallest size >= 3 that divides
    them (81 -> 27 groups of 3, as in Tramèr and Boneh's ScatterNet models); one group if none does."""
    for size in range(3, channels):
        if channels % size == 0:
            return channels // size
    return 1


class ScatNet(nn.Module):
    """Fixed scattering front end, then GroupNorm, one 3x3 convolution (`width` channels, `activation`, tanh
    by default: bounded activations lose less to clipping) and a linear layer.

    ``front`` is kymatio's :class:`ScatteringTorch2D`: no parameters, and filter buffers that are
    fixed and left out of the state_dict. ``head`` holds every trainable parameter.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, image_size: int = 28, *, scale: int | None = None,
                 orientations: int = 8, order: int = 2, width: int = 32,
                 activation: Callable[[], nn.Module] = nn.Tanh) -> None:
        super().__init__()
        scale = auto_scale(image_size) if scale is None else scale
        _check_settings(image_size, scale, orientations, order)
        self.in_channels, self.image_size = in_channels, image_size
        self.scale, self.orientations, self.order = scale, orientations, order
        # A copy of the filter bank built once per process: building it takes about a second, and a
        # hospital builds its model afresh every round.
        self.front = copy.deepcopy(_scattering(scale, image_size, orientations, order))
        side = image_size // 2**scale  # kymatio subsamples by 2^J, rounding down
        channels = in_channels * coefficients_per_channel(scale, orientations, order)
        self.coefficient_shape = (channels, side, side)
        pooled = min(side, TARGET_SIDE)
        self.head = nn.Sequential(
            nn.GroupNorm(_group_count(channels), channels),
            nn.Conv2d(channels, width, 3, padding=1),
            activation(),
            # Identity at the sizes J was chosen for; otherwise a fixed average pool bounds the linear layer.
            nn.Identity() if pooled == side else nn.AdaptiveAvgPool2d(pooled),
            nn.Flatten(),
            nn.Linear(width * pooled * pooled, num_classes),
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The scattering coefficients of `images` ``(N, C, H, W)`` as ``(N, C*K, H', W')``.

        Differentiable (autograd is left on): the privacy audit's gradient inversion goes through it."""
        coefficients = self.front(images.contiguous())  # (N, C, K, H', W')
        return coefficients.reshape(len(images), *self.coefficient_shape)

    @torch.no_grad()
    def precompute(self, images: torch.Tensor) -> torch.Tensor:
        """The coefficients of `images`, computed in batches without gradients: what a hospital trains on."""
        self._check_input(images, allow_coefficients=False)
        if len(images) == 0:
            return images.new_zeros((0, *self.coefficient_shape))
        return torch.cat([self.features(images[start:start + PRECOMPUTE_BATCH])
                          for start in range(0, len(images), PRECOMPUTE_BATCH)])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self._check_input(inputs, allow_coefficients=True) == "images":
            inputs = self.features(inputs)
        return self.head(inputs)

    def _check_input(self, inputs: torch.Tensor, *, allow_coefficients: bool) -> str:
        image_shape = (self.in_channels, self.image_size, self.image_size)
        shape = tuple(inputs.shape[1:])
        if inputs.ndim == 4 and shape == image_shape:
            return "images"
        if allow_coefficients and inputs.ndim == 4 and shape == self.coefficient_shape:
            return "coefficients"
        expected = f"images (N, {', '.join(map(str, image_shape))})"
        if allow_coefficients:
            expected += f" or their scattering coefficients (N, {', '.join(map(str, self.coefficient_shape))})"
        raise ValueError(f"ScatNet got input of shape {tuple(inputs.shape)}; it takes {expected}. Fix: give it the "
                         "images of the dataset it was built for (model.name=scatnet, dataset.size, channels)")


@functools.lru_cache(maxsize=8)
def _scattering(scale: int, image_size: int, orientations: int, order: int) -> nn.Module:
    """kymatio's scattering module for these settings, its filters non-persistent buffers."""
    # Deferred and narrow: kymatio's package root (kymatio.torch) imports its 3-D module, which
    # needs scipy.special.sph_harm, removed from current SciPy; the 2-D torch frontend does not.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    front = ScatteringTorch2D(J=scale, shape=(image_size, image_size), L=orientations, max_order=order)
    # The filters are a pure function of (J, L, order, size): re-register them as non-persistent,
    # so the weights a hospital sends (and every checkpoint) hold the trainable head only.
    for name, buffer in list(front.named_buffers(recurse=False)):
        front.register_buffer(name, buffer, persistent=False)
    return front


def _check_settings(image_size: int, scale: int, orientations: int, order: int) -> None:
    if not (isinstance(scale, int) and 1 <= scale and 2**scale <= image_size):
        raise ConfigError("model.scale", scale, f"the scattering scale J must be a whole number with 1 <= J and "
                          f"2^J <= the image size ({image_size})", "set model.scale=null (automatic) or e.g. 2")
    if not (isinstance(orientations, int) and 1 <= orientations <= 16):
        raise ConfigError("model.orientations", orientations, "must be a whole number from 1 to 16",
                          "use model.orientations=8")
    if order not in (1, 2):
        raise ConfigError("model.order", order, "the scattering order must be 1 or 2", "use model.order=2")


def precomputed(model: nn.Module, records: LabeledImages) -> LabeledImages:
    """`records` with each image replaced by what `model`'s fixed front end makes of it, computed once.

    Models without a ``precompute`` method get `records` back unchanged. Record ids, patient ids and
    attributes stay with their images: the ledger keeps charging the same records (content ids are
    computed from the images before they are replaced).
    """
    precompute = getattr(model, "precompute", None)
    if precompute is None or len(records) == 0:
        return records
    prepared = LabeledImages(precompute(records.images), records.labels, records.attributes, records.record_ids,
                             records.patient_ids)
    if records.record_ids is None:
        # Content ids (a digest of image and label) must stay those of the images, not of their coefficients.
        # They are not unique (identical images are one record), so they cannot become record_ids; they are
        # handed on the way LabeledImages.subset hands them on.
        prepared._content_ids = records.ids()
    return prepared
