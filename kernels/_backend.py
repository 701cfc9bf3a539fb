"""Triton import shim and the backend rule shared by the kernels.

The package must import on machines without triton (or without a GPU): `jit` is then a no-op decorator and `tl`
a stand-in whose only job is to make the `tl.constexpr` annotations evaluate; no kernel is ever launched.
Triton picks compiled-vs-interpreted when a kernel is *decorated*, from TRITON_INTERPRET at that moment
(PITFALLS M7), so we record the mode once, at import.
"""
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl

    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    jit = triton.jit
except ImportError:  # torch backend only
    triton = None
    INTERPRET = False

    class tl:  # noqa: N801 - stand-in namespace for annotations
        constexpr = None

    def jit(fn):
        return fn


BACKENDS = ("auto", "torch", "triton")
# The kernels have only been run in Triton's interpreter on CPU unless someone ran tests/test_kernels.py on a GPU
# (TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py). So backend="auto" does not trust them blindly: the
# first use of a kernel on a CUDA device runs its self-check there (the kernel against its float64 twin on a small
# random input, forward and backward), and a kernel that fails it is not used on that device again.
SELF_CHECKS = {}  # where -> check(device) (kernels/selfcheck.py): None if the kernel agrees, else what differs
_trusted = {}  # (where, device) -> the self-check's verdict


def trusted(where, device):
    """Run where's self-check once per device (a compile or launch error fails it too); warn when it fails."""
    key = (where, str(device))
    if key not in _trusted:
        try:
            with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
                why = SELF_CHECKS[where](device)
        except Exception as e:  # noqa: BLE001 - any failure means: do not use this kernel here
            why = f"{type(e).__name__}: {e}"
        if why:
            warnings.warn(f"{where}: the Triton kernel failed its first-use check on {device} ({why}); using the "
                          "torch path on this device. To investigate: TRITON_INTERPRET=0 python -m pytest "
                          "tests/test_kernels.py", RuntimeWarning, stacklevel=3)
        _trusted[key] = not why
    return _trusted[key]


def use_triton(backend, *tensors, where="kernels"):
    """True to run the Triton kernel, False for the torch path; a clear error for an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend={backend!r} must be one of {BACKENDS}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        if not (triton is not None and on_cuda):
            return False
        return where not in SELF_CHECKS or trusted(where, tensors[0].device)
    if backend == "torch":
        return False
    if triton is None:
        raise RuntimeError(f"{where}: backend='triton' needs the triton package (pip install triton)")
    if not on_cuda and not INTERPRET:
        raise RuntimeError(f"{where}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is first imported (tests/conftest.py does this)")
    return True
