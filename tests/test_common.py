import dataclasses
import os
import subprocess
import sys
from typing import Literal, Optional

import pytest
import torch

import common
from common import ConfigError, parse_config


@dataclasses.dataclass
class Cfg:
    """test settings"""
    lr: float = 1e-4
    max_steps: int = 10
    name: str = "run"
    compile: bool = False
    init_from: Optional[str] = None
    stop_ids: list[int] = dataclasses.field(default_factory=list)
    loss_agg: Literal["seq", "token", "drgrpo"] = "seq"
    preset: str = ""


PRESETS = {"cpu": {"lr": 3e-4, "max_steps": 5, "stop_ids": [1, 2]}}


def test_flags_parse_with_types():
    c = parse_config(Cfg, ["--lr=3e-3", "--max-steps", "20", "--compile", "--init-from=none", "--stop-ids=3,4",
                           "--loss-agg=token", "--name=x=y"])
    assert c.lr == 3e-3 and c.max_steps == 20 and c.compile is True and c.init_from is None
    assert c.stop_ids == [3, 4] and c.loss_agg == "token" and c.name == "x=y"
    assert parse_config(Cfg, ["--compile=false"]).compile is False
    assert parse_config(Cfg, ["--max-steps=1e3"]).max_steps == 1000
    assert parse_config(Cfg, []) == Cfg()
    assert parse_config(Cfg, ["--lr=1", "--lr=2"]).lr == 2.0  # the last one wins


def test_preset_then_flags_override():
    c = parse_config(Cfg, ["--preset=cpu", "--lr=1e-2"], PRESETS)
    assert c.lr == 1e-2 and c.max_steps == 5 and c.stop_ids == [1, 2] and c.preset == "cpu"
    # order does not matter: explicit flags always win over the preset
    c2 = parse_config(Cfg, ["--lr=1e-2", "--preset", "cpu"], PRESETS)
    assert c2 == c


@pytest.mark.parametrize("argv, needle", [
    (["--lr=fast"], "--lr='fast': expected a number"),
    (["--max-steps=1.5"], "--max-steps='1.5': expected an integer"),
    (["--compile=maybe"], "--compile='maybe': expected a boolean"),
    (["--loss-agg=mean"], "--loss-agg='mean': must be one of seq, token, drgrpo"),
    (["--max-step=3"], "unknown flag --max-step. Did you mean --max-steps"),
    (["--preset=gpu"], "--preset='gpu': unknown preset; known: cpu"),
    (["lr=3"], "unexpected argument 'lr=3'"),
    (["--stop-ids=1,x"], "--stop-ids='x': expected an integer"),
])
def test_bad_flags_name_the_flag(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(Cfg, argv, PRESETS)
    assert needle in str(e.value)


@pytest.mark.parametrize("argv", [["grpo.py", "--preset=cpu", "--init-from={bad}", "--out-dir={tmp}/rl"],
                                  ["eval.py", "--model={bad}"],
                                  ["sft.py", "--data={data}", "--tokenizer={tok}", "--init-from={bad}",
                                   "--out-dir={tmp}/sft"]])
@pytest.mark.parametrize("bad", ["missing", "garbage.pt", "empty.pt", "emptydir"])
def test_a_bad_model_path_is_one_line_naming_the_flag(tmp_path, argv, bad):
    """--init-from / --model pointing at nothing, or at a file that is no checkpoint: one line naming the flag and
    the path, exit status 2, no traceback."""
    import data
    (tmp_path / "garbage.pt").write_text("not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "emptydir").mkdir()
    tok = data.toy_tokenizer(n_docs=50)
    tok.save(str(tmp_path / "tok.bpe"))
    (tmp_path / "c.txt").write_text("12+34=46<|endoftext|>" * 50)
    args = [a.format(bad=tmp_path / bad, tmp=tmp_path, data=tmp_path / "c.txt", tok=tmp_path / "tok.bpe")
            for a in argv]
    r = subprocess.run([sys.executable, *args], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, timeout=120)
    flag = "--model" if argv[0] == "eval.py" else "--init-from"
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"{argv[0]}: {flag}={tmp_path / bad}: "), r.stderr


def test_help_lists_fields(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"], PRESETS)
    out = capsys.readouterr().out
    assert "--max-steps=10" in out and "--init-from=None" in out and "cpu" in out


def test_config_from_dict_roundtrip_and_errors():
    c = parse_config(Cfg, ["--preset=cpu"], PRESETS)
    assert common.config_from_dict(Cfg, dataclasses.asdict(c)) == c
    with pytest.raises(ConfigError, match="ckpt.json: unknown setting.*bogus"):
        common.config_from_dict(Cfg, {"bogus": 1}, where="ckpt.json")


def test_seeding_and_rng_state_roundtrip():
    common.seed_everything(3)
    state = common.rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    common.set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_dtype_and_device():
    assert common.get_dtype("auto", torch.device("cpu")) == torch.float32
    assert common.get_dtype("bf16") == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype 'half-ish'"):
        common.get_dtype("half-ish")
    assert common.get_device("cpu").type == "cpu"


def test_atomic_write_survives_a_kill_mid_write(tmp_path):
    """A writer killed while writing leaves the previous complete file in place (no partial file at the name)."""
    path = tmp_path / "ckpt.pt"
    common.atomic_torch_save({"step": 1}, str(path))
    code = (f"import os, common, torch\n"
            f"orig = torch.save\n"
            f"def dying(obj, f):\n"
            f"    f.write(b'partial'); f.flush(); os._exit(9)\n"
            f"torch.save = dying\n"
            f"common.atomic_torch_save({{'step': 2}}, {str(path)!r})\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(common.__file__))
    assert r.returncode == 9
    assert torch.load(str(path))["step"] == 1


def test_metrics_logger_writes_jsonl(tmp_path):
    log = common.MetricsLogger(str(tmp_path))
    log.log({"loss": torch.tensor(0.5), "n": 3}, step=1)
    log.log({"loss": 0.25}, step=2)
    rows = [__import__("json").loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 1, "loss": 0.5, "n": 3}, {"step": 2, "loss": 0.25}]


def test_checkpoints_keep_last_and_ignore_partial_files(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (10, 20, 30):
        common.save_checkpoint(str(tmp_path), step, {"model": model}, opt, {"step": step}, keep_last=2)
    (tmp_path / ".ckpt_0000040.pt.tmp123").write_bytes(b"half a checkpoint")  # a save killed midway
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt_"))
    assert names == ["ckpt_0000020.pt", "ckpt_0000030.pt"]
    state = common.load_checkpoint(str(tmp_path))
    assert state["step"] == 30
    other = torch.nn.Linear(2, 2)
    opt2 = torch.optim.SGD(other.parameters(), lr=0.5)
    common.restore_checkpoint(state, {"model": other}, opt2)
    assert torch.equal(other.weight, model.weight) and opt2.param_groups[0]["lr"] == 0.1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ckpt_"):
        common.load_checkpoint(str(tmp_path / "empty"))


def test_lr_schedule():
    assert common.lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert common.lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert common.lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert common.lr_at(100, 1.0, 10, 100, min_lr_frac=0.1) == pytest.approx(0.1)
    assert common.lr_at(55, 1.0, 10, 100, min_lr_frac=0.0) == pytest.approx(0.5)
    assert common.lr_at(50, 2.0, 0, 100, schedule="constant") == 2.0
    with pytest.raises(ConfigError, match="lr-schedule"):
        common.lr_at(50, 2.0, 0, 100, schedule="linear")


def test_adamw_decays_matrices_only():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = common.adamw(m, 1e-3, weight_decay=0.1)
    decay, rest = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert rest["weight_decay"] == 0.0 and len(rest["params"]) == 3


def test_metrics_logger_mirrors_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = common.MetricsLogger(str(tmp_path), {"lr": 1e-3}, wandb_project="nano-r1-test", wandb_mode="offline")
    log.log({"loss": 1.5}, step=1)
    log.finish()
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 1.5}'
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(f.suffix == ".wandb" for f in runs[0].iterdir())  # the run was recorded locally
