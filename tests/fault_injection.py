"""Helpers that make real faults happen in child processes (no mocks of the code under test)."""

from __future__ import annotations

import ctypes
import os

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def without_permission_override() -> None:
    """subprocess preexec_fn: the child obeys file modes even when it runs as root.

    Root bypasses read-only modes through CAP_DAC_OVERRIDE; dropping it (and CAP_DAC_READ_SEARCH)
    from the bounding set before exec means the child runs without them, as an ordinary user
    would. A non-root child needs nothing: the modes already apply.
    """
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "cannot drop CAP_DAC_OVERRIDE")
