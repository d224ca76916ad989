"""Which torch device trains and evaluates: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

``auto`` (the default) is CUDA where this process sees a CUDA device, else the CPU. Asking for CUDA
where there is none is a :class:`~fedpriv.errors.ConfigError`, never a silent fall-back to the CPU.
The device is each hospital's own choice of hardware: it changes where the arithmetic runs, not the
DP-SGD mechanism or its accounting.

No torch at import time: a deployed hospital checks its node config's ``device`` before it loads
torch (:func:`check_device`); only :func:`resolve_device` asks torch what this machine has.
"""

from __future__ import annotations

import os
import re
from typing import Any

from fedpriv.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # and cuda:N, one CUDA device by its index
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def check_device(value: Any, *, key: str = "device", fix: str | None = None) -> str:
    """The device setting as written, checked for its form only (no torch): auto, cpu, cuda or cuda:N."""
    text = str(value).strip().lower() if isinstance(value, str) else value
    if not isinstance(text, str) or not (text in DEVICE_CHOICES or _CUDA_INDEX.fullmatch(text)):
        raise ConfigError(key, value, "unknown device; known: auto, cpu, cuda, cuda:N (N: a CUDA device's index)",
                          fix or f"set {key}=auto (CUDA where there is one, else the CPU) or {key}=cpu")
    return text


def resolve_device(value: Any, *, key: str = "device", fix: str | None = None) -> str:
    """The torch device `value` means on this machine: "cpu", "cuda" or "cuda:N".

    ``auto`` gives "cuda" where ``torch.cuda.is_available()``, else "cpu". ``cuda`` or ``cuda:N``
    where this process sees no such CUDA device raises ConfigError (`key` names the setting).
    """
    import torch  # deferred: see the module's docstring

    device = check_device(value, key=key, fix=fix)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    fix = fix or f"use {key}=auto or {key}=cpu, or run on a machine with a CUDA GPU and a CUDA build of torch"
    if not torch.cuda.is_available():
        hidden = ""
        if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
            # Ray does this to a worker given no GPU share: the machine may have GPUs this process cannot see.
            hidden = "; CUDA_VISIBLE_DEVICES is empty in this process, which hides every GPU"
        raise ConfigError(key, value, f"no CUDA device on this machine (torch {torch.__version__}: "
                          f"torch.cuda.is_available() is False{hidden})", fix)
    index = _CUDA_INDEX.fullmatch(device)
    if index is not None and int(index.group(1)) >= torch.cuda.device_count():
        raise ConfigError(key, value, f"this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0", fix)
    return device
