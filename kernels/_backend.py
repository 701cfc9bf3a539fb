"""Triton import shim and the backend rule shared by the kernels.

The package must import on machines without triton (or without a GPU): `jit` is then a no-op decorator and `tl`
a stand-in whose only job is to make the `tl.constexpr` annotations evaluate; no kernel is ever launched.
Triton picks compiled-vs-interpreted when a kernel is *decorated*, from TRITON_INTERPRET at that moment
(PITFALLS M7), so we record the mode once, at import.
"""
import os

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


def use_triton(backend, *tensors, where="kernels"):
    """True to run the Triton kernel, False for the torch path; a clear error for an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend={backend!r} must be one of {BACKENDS}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return triton is not None and on_cuda
    if backend == "torch":
        return False
    if triton is None:
        raise RuntimeError(f"{where}: backend='triton' needs the triton package (pip install triton)")
    if not on_cuda and not INTERPRET:
        raise RuntimeError(f"{where}: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is first imported (tests/conftest.py does this)")
    return True
