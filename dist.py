"""One process or many: torchrun ranks, devices and dtypes, seeds and RNG state, collectives, FSDP2.

Every entry point runs the same script on every rank. In a plain `python` run rank() is 0, world_size() is 1 and
every collective here is the identity, so the code reads the same either way.
"""
import contextlib
import os
import random

import numpy as np
import torch

from config import ConfigError

# ----------------------------------------------------------------------------------------------------------------
# processes and collectives (identity in a single process)


def rank():
    return int(os.environ.get("RANK", "0"))


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def print0(*args, **kwargs):
    """print on rank 0 only (every rank of a torchrun job runs the same script)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed():
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); a plain run needs nothing."""
    if world_size() > 1 and not distributed():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")


def all_gather(items):
    """Concatenate a python list over ranks (the same list on every rank)."""
    if not distributed():
        return list(items)
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, list(items))
    return [x for p in parts for x in p]


def all_reduce_max(x):
    """The largest value of a python number over ranks."""
    if not distributed():
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device="cuda" if torch.distributed.get_backend() == "nccl"
                     else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def all_reduce_sum(x):
    """Sum a python number or tensor over ranks; returns the same kind."""
    if not distributed():
        return x
    t = torch.as_tensor(x, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.item() if not isinstance(x, torch.Tensor) else t.to(x)


# ----------------------------------------------------------------------------------------------------------------
# seeds, devices, dtypes, threads


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Everything needed to continue the random streams exactly after a resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def get_device(name="auto"):
    """'auto' -> cuda (this rank's GPU under torchrun) if available, else mps, else cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cpu_has_bf16():
    """Does oneDNN have native bf16 matmuls on this CPU (AVX512-BF16 or AMX)?"""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def get_dtype(name, device=None):
    """'auto' -> bf16 on a GPU that supports it, fp32 otherwise (CPU bf16 matmuls are slow and imprecise)."""
    dev = device if device is not None else get_device()
    if name == "auto":
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; one of: auto, {', '.join(_DTYPES)}")
    if name in ("bf16", "bfloat16") and dev.type == "cpu" and not cpu_has_bf16():
        # no AVX512-BF16/AMX: bf16 matmuls are emulated (pretraining the toy: 1,028 tok/s against 8,297 in fp32
        # on an AVX2-only AMD EPYC, 2026-12-07)
        print0(f"WARNING --dtype={name}: this CPU has no native bf16 matmul, bf16 runs ~8x slower than fp32 here")
    return _DTYPES[name]


def set_threads(n=0):
    """Torch intra-op threads: 0 means all cores of this machine shared by the local ranks."""
    if n <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        n = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(n)
    return n


def start(c):
    """What grpo.py, sft.py and eval.py do first, in this order: join the process group under torchrun, set the
    torch threads, pick the device and the dtype, seed python, numpy and torch with c.seed (a resumed run then
    restores the RNG state of its checkpoint). dtype bf16 means bf16 compute over fp32 master weights (autocast in
    one process, FSDP's MixedPrecisionPolicy under torchrun): bf16 weights would round small AdamW updates away.
    -> (device, dtype)"""
    init_distributed()
    set_threads(c.threads)
    device = get_device(c.device)
    dtype = get_dtype(c.dtype, device)
    seed_everything(c.seed)
    return device, dtype


# ----------------------------------------------------------------------------------------------------------------
# mixed precision and FSDP2


def autocast(device, dtype):
    """bf16/fp16 compute over fp32 weights in a single process (under torchrun, shard_model's MixedPrecisionPolicy
    does this instead); a no-op for fp32/fp64."""
    if dtype in (torch.bfloat16, torch.float16) and not distributed():
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def shard_model(model, bf16=False):
    """FSDP2: fully_shard every transformer block, then the root. bf16: compute in bf16, reduce gradients in fp32.
    Transformer.logprobs (the training forward) is registered so it unshards like forward does."""
    if not distributed():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "logprobs")
    return model


class gathered:
    """with gathered(model): ... -- parameters unsharded once for a whole generation (not all-gathered again at
    every decode step), resharded on exit. A no-op without FSDP."""

    def __init__(self, model):
        from torch.distributed.fsdp import FSDPModule
        self.mods = [m for m in model.modules() if isinstance(m, FSDPModule)] if distributed() else []

    def __enter__(self):
        for m in self.mods:
            m.set_reshard_after_forward(False)
            m.unshard()

    def __exit__(self, *exc):
        for m in self.mods:
            m.reshard()
            m.set_reshard_after_forward(True)
