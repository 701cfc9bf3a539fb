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
import os
import random
import sys
import types
import typing

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------
# config -> flags


class ConfigError(ValueError):
    """A bad flag or setting; the message names the flag."""


def _flag(name):
    return "--" + name.replace("_", "-")


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
        tp = getattr(hints[f.name], "__name__", str(hints[f.name]))
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
# checkpoints: one file per save, `ckpt_<step>.pt`, written atomically; the newest complete one is the resume point


def save_checkpoint(out_dir, step, state, keep_last=2):
    """Atomically write `state` as out_dir/ckpt_<step>.pt, then delete all but the newest `keep_last` checkpoints.
    A process killed mid-save leaves only a hidden temporary file, which `latest_checkpoint` ignores."""
    path = os.path.join(out_dir, f"ckpt_{step:07d}.pt")
    atomic_torch_save(state, path)
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        os.remove(old)
    return path


def list_checkpoints(out_dir):
    if not os.path.isdir(out_dir):
        return []
    names = sorted(n for n in os.listdir(out_dir) if n.startswith("ckpt_") and n.endswith(".pt"))
    return [os.path.join(out_dir, n) for n in names]


def latest_checkpoint(out_dir):
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path):
    """Load a checkpoint file, or the newest checkpoint of a run directory."""
    if os.path.isdir(path):
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"{path}: no ckpt_*.pt checkpoint in this directory")
        path = newest
    # weights_only=False: checkpoints hold python/numpy RNG states; only load checkpoints you wrote yourself
    return torch.load(path, map_location="cpu", weights_only=False)


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


def all_reduce_sum(x):
    """Sum a python number or tensor over ranks; returns the same kind."""
    if not distributed():
        return x
    t = torch.as_tensor(x, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return t.item() if not isinstance(x, torch.Tensor) else t.to(x)
