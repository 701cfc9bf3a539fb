import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import hf
import toy
from model import ModelConfig, Transformer
from test_model import T, V, perturb


def test_atomic_write_survives_a_kill_mid_write(tmp_path):
    """A writer killed while writing leaves the previous complete file in place (no partial file at the name)."""
    path = tmp_path / "ckpt.pt"
    checkpoint.atomic_torch_save({"step": 1}, str(path))
    code = (f"import os, checkpoint, torch\n"
            f"orig = torch.save\n"
            f"def dying(obj, f):\n"
            f"    f.write(b'partial'); f.flush(); os._exit(9)\n"
            f"torch.save = dying\n"
            f"checkpoint.atomic_torch_save({{'step': 2}}, {str(path)!r})\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(checkpoint.__file__))
    assert r.returncode == 9
    assert torch.load(str(path))["step"] == 1


def test_checkpoints_keep_last_and_ignore_partial_files(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (10, 20, 30):
        checkpoint.save_checkpoint(str(tmp_path), step, {"model": model}, opt, {"step": step}, keep_last=2)
    (tmp_path / ".ckpt_0000040.pt.tmp123").write_bytes(b"half a checkpoint")  # a save killed midway
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt_"))
    assert names == ["ckpt_0000020.pt", "ckpt_0000030.pt"]
    state = checkpoint.load_checkpoint(str(tmp_path))
    assert state["step"] == 30
    other = torch.nn.Linear(2, 2)
    opt2 = torch.optim.SGD(other.parameters(), lr=0.5)
    checkpoint.restore_checkpoint(state, {"model": other}, opt2)
    assert torch.equal(other.weight, model.weight) and opt2.param_groups[0]["lr"] == 0.1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ckpt_"):
        checkpoint.load_checkpoint(str(tmp_path / "empty"))


@pytest.mark.parametrize("argv", [["grpo.py", "--preset=cpu", "--init-from={bad}", "--out-dir={tmp}/rl"],
                                  ["eval.py", "--model={bad}"],
                                  ["sft.py", "--data={data}", "--tokenizer={tok}", "--init-from={bad}",
                                   "--out-dir={tmp}/sft"]])
@pytest.mark.parametrize("bad", ["missing", "garbage.pt", "empty.pt", "emptydir"])
def test_a_bad_model_path_is_one_line_naming_the_flag(tmp_path, argv, bad):
    """--init-from / --model pointing at nothing, or at a file that is no checkpoint: one line naming the flag and
    the path, exit status 2, no traceback."""
    (tmp_path / "garbage.pt").write_text("not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "emptydir").mkdir()
    tok = toy.toy_tokenizer(n_docs=50)
    tok.save(str(tmp_path / "tok.bpe"))
    (tmp_path / "c.txt").write_text("12+34=46<|endoftext|>" * 50)
    args = [a.format(bad=tmp_path / bad, tmp=tmp_path, data=tmp_path / "c.txt", tok=tmp_path / "tok.bpe")
            for a in argv]
    r = subprocess.run([sys.executable, *args], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, timeout=120)
    flag = "--model" if argv[0] == "eval.py" else "--init-from"
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"{argv[0]}: {flag}={tmp_path / bad}: "), r.stderr


def test_load_model_from_checkpoint_run_dir_and_hf_dir(tmp_path):
    m = perturb(Transformer(ModelConfig(vocab_size=V))).eval()
    checkpoint.save_checkpoint(str(tmp_path / "run"), 5, {"model": m}, torch.optim.SGD(m.parameters(), lr=0.1),
                               {"model_config": dataclasses.asdict(m.config)})
    hf.save(m, str(tmp_path / "hf"))
    tokens = torch.randint(0, V, (1, T))
    with torch.no_grad():
        ref = m(tokens)
        for path in (tmp_path / "run", tmp_path / "run" / "ckpt_0000005.pt", tmp_path / "hf"):
            assert torch.equal(checkpoint.load_model(str(path)).eval()(tokens), ref), path
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face"):
        checkpoint.load_model(str(tmp_path))
