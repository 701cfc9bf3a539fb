"""Shared plumbing for the entry points: config -> CLI flags, printing, seeding, device/dtype choice,
metrics logging and atomic checkpoint files.

Every entry point (grpo.py, sft.py, eval.py) owns one @dataclass of settings. `parse_config` turns each field
into a flag `--field-name=value` (underscores become dashes), checks the value against the field's type, and
fails with a message naming the flag on anything it cannot use. Presets are plain dicts of field -> value that
`--preset=name` applies before the other flags, so `--preset=cpu --lr=3e-4` means "the cpu preset, but lr 3e-4".
"""
import dataclasses
import difflib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import types
import typing

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------
# config -> flags


class UserError(ValueError):
    """A mistake in the input (flags, files, data): entry points print the message, not a traceback."""


class ConfigError(UserError):
    """A bad flag or setting; the message names the flag."""


def _flag(name):
    return "--" + name.replace("_", "-")


def need(cond, flag, msg):
    """A settings check: raise ConfigError naming --flag unless cond holds."""
    if not cond:
        raise ConfigError(f"--{flag.replace('_', '-')}: {msg}")


def _convert(flag, tp, text):
    """Parse the string `text` for a field of type `tp`; raise ConfigError naming `flag` if it does not fit."""
    if tp in (list, tuple):  # a bare list: comma-separated strings
        tp = list[str] if tp is list else tuple[str, ...]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        if len(non_none) != 1:
            raise ConfigError(f"{flag}: unsupported union type {tp}")
        return _convert(flag, non_none[0], text)
    if origin is typing.Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ConfigError(f"{flag}={text!r}: must be one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        inner = args[0] if args else str
        items = [] if text.strip() == "" else [s.strip() for s in text.split(",")]
        vals = [_convert(flag, inner, s) for s in items]
        return vals if origin is list else tuple(vals)
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{flag}={text!r}: expected a boolean (true/false)")
    if tp is int:
        try:
            f = float(text)  # accept 1e3 but not 1.5
        except ValueError:
            raise ConfigError(f"{flag}={text!r}: expected an integer") from None
        if not f.is_integer():
            raise ConfigError(f"{flag}={text!r}: expected an integer")
        return int(f)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{flag}={text!r}: expected a number") from None
    if tp is str:
        return text
    raise ConfigError(f"{flag}: unsupported field type {tp}")


def _check_value(flag, tp, value):
    """Check a Python value (from a preset or config.json) against a field type by round-tripping through text."""
    if isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value)
    elif value is None:
        text = "none"
    else:
        text = str(value)
    return _convert(flag, tp, text)


def parse_config(cls, argv=None, presets=None):
    """Build a `cls` dataclass from command-line flags.

    argv: list of strings (default sys.argv[1:]); each is `--field-name=value`, `--field-name value`, or a bare
    `--flag` for a boolean (true). `--preset=name` applies `presets[name]` first. `--help` lists the fields.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    presets = presets or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    by_flag = {_flag(n): n for n in fields}
    values, preset = {}, None
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(config_help(cls, presets))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: settings are given as --name=value")
        key, eq, text = arg.partition("=")
        if key == "--preset":
            if not eq:
                if i >= len(argv):
                    raise ConfigError("--preset needs a value")
                text, i = argv[i], i + 1
            if text not in presets:
                raise ConfigError(f"--preset={text!r}: unknown preset; known: {', '.join(presets) or '(none)'}")
            preset = text
            continue
        if key not in by_flag:
            close = difflib.get_close_matches(key, list(by_flag) + ["--preset"], n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"unknown flag {key}.{hint} Run with --help to list the settings.")
        name = by_flag[key]
        tp = hints[name]
        if not eq:
            if tp is bool and (i >= len(argv) or argv[i].startswith("--")):
                text = "true"
            elif i < len(argv):
                text, i = argv[i], i + 1
            else:
                raise ConfigError(f"{key} needs a value")
        values[name] = _convert(key, tp, text)  # a flag given twice: the last one wins, as in argparse
    merged = {}
    if preset is not None:
        for name, v in presets[preset].items():
            if name not in fields:
                raise ConfigError(f"preset {preset!r} sets unknown field {name!r}")
            merged[name] = _check_value(_flag(name), hints[name], v)
    merged.update(values)
    cfg = cls(**merged)
    if hasattr(cfg, "preset") and preset is not None:
        cfg.preset = preset
    return cfg


def config_help(cls, presets=None):
    hints = typing.get_type_hints(cls)
    lines = [(cls.__doc__ or cls.__name__).strip(), "", "flags (default):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        tp = hints[f.name]
        tp = "|".join(map(str, typing.get_args(tp))) if typing.get_origin(tp) is typing.Literal else \
            getattr(tp, "__name__", str(tp))
        lines.append(f"  {_flag(f.name)}={default!r}  [{tp}]")
    if presets:
        lines.append("")
        lines.append("--preset=NAME applies one of: " + ", ".join(presets))
    return "\n".join(lines)


def config_from_dict(cls, d, where="config"):
    """Rebuild a dataclass from a dict (config.json / a checkpoint), checking names and types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    return cls(**{k: _check_value(k, hints[k], v) for k, v in d.items()})


# ----------------------------------------------------------------------------------------------------------------
# processes, printing, seeding, devices


def rank():
    return int(os.environ.get("RANK", "0"))


def world_size():
    return int(os.environ.get("WORLD_SIZE", "1"))


def print0(*args, **kwargs):
    """print on rank 0 only (every rank of a torchrun job runs the same script)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


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


def get_dtype(name, device=None):
    """'auto' -> bf16 on a GPU that supports it, fp32 otherwise (CPU bf16 matmuls are slow and imprecise)."""
    if name == "auto":
        dev = device if device is not None else get_device()
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def set_threads(n=0):
    """Torch intra-op threads: 0 means all cores of this machine shared by the local ranks."""
    if n <= 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        n = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------------------------------------------
# files: atomic writes, metrics


def atomic_write_bytes(path, data):
    """Write to a temporary name in the same directory, fsync, then rename: readers see the old or the new file,
    never a partial one, even if the process dies mid-write."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def atomic_torch_save(obj, path):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLogger:
    """Appends one JSON object per call to `metrics.jsonl` (rank 0) and mirrors it to wandb when a project is
    given. wandb is imported only then, and `mode=offline` works without a network."""

    def __init__(self, out_dir, config=None, wandb_project="", wandb_mode="online", run_name=None):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.wandb = None
        if rank() != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        if wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, name=run_name, mode=wandb_mode, dir=out_dir,
                                    config=dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config)

    def log(self, metrics, step):
        if rank() != 0:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


# ----------------------------------------------------------------------------------------------------------------
# checkpoints. One process: ckpt_<step>.pt, one file, written to a temporary name and renamed. Under torchrun:
# ckpt_<step>/, a torch.distributed.checkpoint (DCP) directory of the sharded model and optimizer plus one small
# extra_rank<r>.pt per rank (its RNG state), written as ckpt_<step>.tmp/ and renamed by rank 0 once every rank is
# done. Either way a process killed mid-save leaves the previous checkpoint as the newest complete one.


def save_checkpoint(out_dir, step, modules, optimizer, extra, keep_last=2):
    """modules: {"model": policy, "ref": ...} (None entries skipped); extra: plain data (step, RNG, cursors...)."""
    modules = {k: m for k, m in modules.items() if m is not None}
    if not distributed():
        state = {k: m.state_dict() for k, m in modules.items()}
        state.update(optimizer=optimizer.state_dict(), **extra)
        path = os.path.join(out_dir, f"ckpt_{step:07d}.pt")
        atomic_torch_save(state, path)
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        path = os.path.join(out_dir, f"ckpt_{step:07d}")
        tmp = path + ".tmp"
        state = {k: get_model_state_dict(m) for k, m in modules.items()}
        state["optimizer"] = get_optimizer_state_dict(modules["model"], optimizer)
        dcp.save(state, checkpoint_id=tmp)
        torch.save({**extra, "world_size": world_size()}, os.path.join(tmp, f"extra_rank{rank()}.pt"))
        torch.distributed.barrier()
        if rank() == 0:
            os.replace(tmp, path)
        torch.distributed.barrier()
    if rank() == 0:
        for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    return path


def list_checkpoints(out_dir):
    if not os.path.isdir(out_dir):
        return []
    names = sorted(n for n in os.listdir(out_dir) if re.fullmatch(r"ckpt_\d+(\.pt)?", n))
    return [os.path.join(out_dir, n) for n in names]


def latest_checkpoint(out_dir):
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path):
    """A checkpoint (file or DCP directory), or the newest checkpoint of a run directory. For a DCP checkpoint this
    returns this rank's extra data with "dcp" set to the directory; restore_checkpoint loads the shards."""
    if os.path.isdir(path) and not re.fullmatch(r"ckpt_\d+", os.path.basename(os.path.normpath(path))):
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"{path}: no ckpt_* checkpoint in this directory")
        path = newest
    if os.path.isdir(path):
        extra = torch.load(os.path.join(path, f"extra_rank{rank()}.pt"), weights_only=False)
        if extra["world_size"] != world_size():
            raise ConfigError(f"--resume: {path} was written by {extra['world_size']} ranks; resume it with as many "
                              f"(this run has {world_size()})")
        return {**extra, "dcp": path}
    # weights_only=False: checkpoints hold python/numpy RNG states; only load checkpoints you wrote yourself
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_checkpoint(state, modules, optimizer):
    """Load the model(s) and optimizer of a load_checkpoint() result (after the model is built and sharded)."""
    modules = {k: m for k, m in modules.items() if m is not None}
    if "dcp" not in state:
        for k, m in modules.items():
            m.load_state_dict(state[k])
        optimizer.load_state_dict(state["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    sd = {k: get_model_state_dict(m) for k, m in modules.items()}
    sd["optimizer"] = get_optimizer_state_dict(modules["model"], optimizer)
    dcp.load(sd, checkpoint_id=state["dcp"])
    for k, m in modules.items():
        set_model_state_dict(m, sd[k])
    set_optimizer_state_dict(modules["model"], optimizer, sd["optimizer"])


# ----------------------------------------------------------------------------------------------------------------
# optimisation


def lr_at(step, lr, warmup_steps, max_steps, schedule="cosine", min_lr_frac=0.1):
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to min_lr_frac * lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ConfigError(f"--lr-schedule={schedule!r}: one of constant, cosine")
    t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + np.cos(np.pi * t)))


def adamw(model, lr, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8):
    """AdamW with weight decay on matrices (and stacked experts) only, not on norms, biases or 1-D tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)


def optimizer_step(model, opt, loss_sum, grad_clip):
    """Clip, then step unless the loss sum or the gradient norm is non-finite (a skipped step leaves the weights and
    the optimizer state untouched); gradients are cleared either way. -> (grad norm before clipping, stepped)."""
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # a DTensor under FSDP
    ok = math.isfinite(loss_sum) and bool(torch.isfinite(gnorm))
    ok = all_reduce_max(0.0 if ok else 1.0) == 0.0  # every rank skips or none does (a local non-finite loss counts)
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm.item(), ok


def append_jsonl(path, rows):
    if rank() != 0:
        return
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# distributed reductions (identity in a single process)


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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
# what every entry point does at its start and end


def cli(main, name):
    """Run an entry point's main(); a UserError prints one line naming the bad input and exits with status 2."""
    try:
        main()
    except UserError as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(2)


def find_tokenizer(flag_value, model_path, flag="--tokenizer"):
    """The tokenizer file: the flag if given, else tokenizer.bpe saved next to the model (sft/grpo final/)."""
    if flag_value:
        if not os.path.isfile(flag_value):
            raise ConfigError(f"{flag}={flag_value}: no such file")
        return flag_value
    for p in (os.path.join(model_path, "tokenizer.bpe"), os.path.join(model_path, "final", "tokenizer.bpe")):
        if os.path.isfile(p):
            return p
    raise ConfigError(f"{flag}: not given, and no tokenizer.bpe next to {model_path}")


def resume_state(c, keep_changes=("resume", "max_steps", "log_every", "sample_every", "eval_every", "ckpt_every",
                                     "keep_last", "wandb_project", "wandb_mode", "threads", "init_from")):
    """The newest checkpoint of run c.out_dir when c.resume, else None. A fresh run refuses an out_dir that holds
    checkpoints (it would mix them up with its own); a resumed one warns about settings that changed."""
    path = latest_checkpoint(c.out_dir)
    if not c.resume:
        if path is not None:
            raise ConfigError(f"--out-dir={c.out_dir} holds checkpoints of an earlier run: add --resume to continue "
                              "it, or choose another --out-dir")
        return None
    if path is None:
        raise ConfigError(f"--resume: no checkpoint in {c.out_dir}")
    print0(f"resuming from {path}")
    state = load_checkpoint(path)
    old = state.get("config", {})
    changed = [k for k, v in dataclasses.asdict(c).items() if k in old and old[k] != v and k not in keep_changes]
    if changed:
        print0("WARNING --resume with changed settings: " + ", ".join(f"{k} {old[k]!r} -> {getattr(c, k)!r}"
                                                                    for k in changed))
    return state


def export_final(model, tok, out_dir):
    """out_dir/final: a Hugging Face directory plus the tokenizer, loadable by every entry point and transformers.
    Every rank takes part (a sharded model is gathered tensor by tensor, rank 0 writes); written to final.tmp and
    renamed, so a crash mid-export never leaves a half-written final/ that looks loadable."""
    final = os.path.join(out_dir, "final")
    tmp = final + ".tmp"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if rank() == 0:
        tok.save(os.path.join(tmp, "tokenizer.bpe"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if distributed():
        torch.distributed.barrier()
    return final


# ----------------------------------------------------------------------------------------------------------------
# torchrun + FSDP2


def init_distributed():
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); a plain run needs nothing."""
    if world_size() > 1 and not distributed():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")


def autocast(device, dtype):
    """bf16/fp16 compute over fp32 weights in a single process (under torchrun, shard_model's MixedPrecisionPolicy
    does this instead); a no-op for fp32/fp64."""
    import contextlib
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


def build_model(path, state, device, dtype=torch.float32, flag="--init-from"):
    """The model to train or evaluate: fp32 (master) weights on `device` (fp64 for dtype fp64), sharded with FSDP2
    under torchrun. A bf16/fp16 dtype is the compute dtype: autocast(device, dtype) in one process, FSDP's bf16
    MixedPrecisionPolicy under torchrun (rounding the weights themselves would lose small updates and the RoPE
    frequencies' precision).
    - resuming (state given): built on the meta device; restore_checkpoint fills the weights;
    - a Hugging Face dir, or a run dir with a final/ export: under torchrun each rank reads only its own shard from
      the safetensors files (hf.load), so no rank ever holds the whole model;
    - a nano-r1 checkpoint file or a run dir without final/: loaded whole, then sharded (small models).
    A path that is none of these is a ConfigError naming `flag`."""
    import hf
    from model import ModelConfig, Transformer, find_hf_dir, load_model
    if distributed() and dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"--dtype={str(dtype).replace('torch.', '')}: under torchrun only float32 and bfloat16")
    bf16, wdtype = dtype == torch.bfloat16, torch.float64 if dtype == torch.float64 else torch.float32
    if state is not None:
        with torch.device("meta"):
            model = Transformer(ModelConfig(**state["model_config"])).to(wdtype)
        model = shard_model(model, bf16)
        hf.materialize(model, device)
        return model
    if find_hf_dir(path):
        return hf.load(find_hf_dir(path), wdtype, device,
                       shard=(lambda m: shard_model(m, bf16)) if distributed() else None)
    try:
        model = load_model(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{flag}={path}: {str(e).removeprefix(f'{path}: ')}") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:  # what torch.load says of a file that is not one
        raise ConfigError(f"{flag}={path}: not a checkpoint torch can read ({type(e).__name__}: {e})") from None
    return shard_model(model.to(device=device, dtype=wdtype), bf16)


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
