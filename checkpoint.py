"""Our checkpoints and a model from a path: atomic files, ckpt_<step> save/load/list, --resume, the final export,
and the model every entry point starts from (a Hugging Face directory, a run directory or a checkpoint file).
The Hugging Face format itself (config.json, safetensors) is hf.py's.
"""
import dataclasses
import json
import os
import pickle
import re
import shutil

import torch

import hf
from config import ConfigError
from dist import distributed, print0, rank, shard_model, world_size
from model import ModelConfig, Transformer

# ----------------------------------------------------------------------------------------------------------------
# atomic files


def atomic_write(path, write):
    """write(f) into a temporary file in path's directory, fsync, then rename it to path: readers see the old or the
    new file, never a partial one, even if the process dies mid-write."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=str) + "\n").encode()))


def atomic_write_jsonl(path, rows):
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def check_vocab(model, tok):
    """The tokenizer's ids must all have a row in the model's embedding and LM head."""
    if tok.vocab_size > model.config.vocab_size:
        raise ConfigError(f"--tokenizer: {tok.vocab_size} tokens do not fit the model's vocab_size "
                          f"{model.config.vocab_size}")


def write_run_config(c, tok=None):
    """Rank 0: create out_dir with the run's settings (config.json) and, given one, its tokenizer."""
    if rank() == 0:
        os.makedirs(c.out_dir, exist_ok=True)
        atomic_write_json(os.path.join(c.out_dir, "config.json"), dataclasses.asdict(c))
        if tok is not None:
            tok.save(os.path.join(c.out_dir, "tokenizer.bpe"))


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


# ----------------------------------------------------------------------------------------------------------------
# a model (and its tokenizer) from a path; the final export


def find_hf_dir(path):
    """path, or its final/ export, when it is a Hugging Face directory (config.json + safetensors; a run directory
    has a config.json too, its settings, but no safetensors); else None."""
    for d in (path, os.path.join(path, "final")):
        if os.path.isfile(os.path.join(d, "config.json")) and any(
                os.path.isfile(os.path.join(d, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
            return d
    return None


def model_from_state(state):
    """The model of a nano-r1 checkpoint dict (keys model_config and model)."""
    model = Transformer(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model


def load_model(path, dtype=torch.float32, device="cpu"):
    """A Hugging Face directory (config.json + safetensors), a run directory (its final/ export, else its newest
    checkpoint) or a nano-r1 checkpoint file (ckpt_*.pt) -> Transformer."""
    if find_hf_dir(path):
        return hf.load(find_hf_dir(path), dtype, device)
    if not os.path.exists(path) or (os.path.isdir(path) and not list_checkpoints(path)):
        raise FileNotFoundError(f"{path}: neither a Hugging Face model directory (config.json) nor a run directory "
                                "with final/ or ckpt_* checkpoints, nor a checkpoint file")
    state = load_checkpoint(path)
    if "dcp" in state:
        raise ValueError(f"{state['dcp']}: a sharded (torchrun) checkpoint; load the run's final/ export, or "
                         "continue the run with torchrun and --resume")
    if "model" not in state or "model_config" not in state:
        raise ValueError(f"{path}: not a nano-r1 checkpoint (needs 'model' and 'model_config')")
    return model_from_state(state).to(device=device, dtype=dtype)


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


def export_final(model, tok, out_dir):
    """out_dir/final: a Hugging Face directory plus the tokenizer, loadable by every entry point and transformers.
    Every rank takes part (a sharded model is gathered tensor by tensor, rank 0 writes); written to final.tmp and
    renamed, so a crash mid-export never leaves a half-written final/ that looks loadable."""
    final = os.path.join(out_dir, "final")
    tmp = final + ".tmp"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    hf.save(model, tmp)
    if rank() == 0:
        tok.save(os.path.join(tmp, "tokenizer.bpe"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if distributed():
        torch.distributed.barrier()
    return final
