import dataclasses
from typing import Literal, Optional

import pytest

from config import ConfigError, parse_config


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


def test_help_lists_fields(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"], PRESETS)
    out = capsys.readouterr().out
    assert "--max-steps=10" in out and "--init-from=None" in out and "cpu" in out


