"""Tests for rewards.py and sandbox_runner.py: tables per reward (with the adversarial cases of PITFALLS P12),
the fast math path against math-verify, the sandbox attack suite, a hypothesis fuzz test and score_batch."""
import dataclasses
import functools
import marshal
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rewards as R
import sandbox_runner

ROOT = os.geteuid() == 0


def tag(ans, think="let me see"):
    return f"<think>{think}</think> <answer>{ans}</answer>"


@dataclasses.dataclass
class Ex:  # the data module's Example, duck-typed
    prompt: str
    answer: str
    kind: str = "math"
    meta: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# accuracy

ACCURACY = [  # (completion, gold, expected)
    (tag("42"), "42", 1.0),
    (tag("41"), "42", 0.0),
    (tag("1,234"), "1234", 1.0),  # thousands separators
    (tag("1234"), "1,234", 1.0),
    (tag("5.0"), "5", 1.0),
    (tag("-3"), "-3", 1.0),
    (tag("3"), "-3", 0.0),
    (tag("0.5"), "\\frac{1}{2}", 1.0),  # fractions and decimals
    (tag("\\frac{1}{2}"), "0.5", 1.0),
    (tag("\\dfrac{3}{4}"), "3/4", 1.0),
    (tag("x = 5"), "5", 1.0),  # assignments
    (tag("5"), "x = 5", 1.0),
    (tag("1"), "2x + z = 1", 0.0),  # gold first (P12): math-verify is not symmetric; an equation gold wants one
    (tag("2x + z = 1"), "1", 1.0),  # ...while an equation answer is read as its right-hand side
    (tag("2\\pi"), "2\\pi", 1.0),  # LaTeX and symbolic forms
    (tag("\\sqrt{2}"), "2^{1/2}", 1.0),
    (tag("\\frac{\\sqrt{3}}{2}"), "\\sqrt{3}/2", 1.0),
    (tag("\\boxed{7}"), "7", 1.0),  # a box inside the answer block
    ("so the result is \\boxed{7}", "7", 1.0),  # no answer block: the last box
    ("first \\boxed{6} then \\boxed{7}", "7", 1.0),
    ("first \\boxed{7} then \\boxed{6}", "7", 0.0),
    ("<think>maybe \\boxed{6}</think><answer>5</answer>", "5", 1.0),  # the answer block wins over a box
    ("The answer is 7", "7", 0.0),  # neither: 0
    ("<answer>7", "7", 0.0),  # unclosed block
    (tag(""), "7", 0.0),  # empty answer
    (tag("   "), "7", 0.0),
    (tag("5 or 6"), "5", 0.0),  # hedging between candidates
    (tag("5, 6, 7"), "5", 0.0),
    (tag("15"), "5", 0.0),  # the gold as a substring of the answer
    (tag("5"), "15", 0.0),  # and the other way round
    (tag("5") + tag("6"), "6", 1.0),  # several blocks: the last counts
    (tag("6") + tag("5"), "6", 0.0),
    (tag("5") + tag("5"), "5", 1.0),  # answer repeated
    (tag("5") + " and some trailing text", "5", 1.0),  # trailing text: accuracy still reads the block
    (tag("7\n"), "7", 1.0),  # an extra newline
    (tag("x" * 2000), "5", 0.0),  # spam
    (tag("5"), "", None),  # unparseable gold: skipped, never 1
    (tag("\\frac{"), "\\frac{", None),
]


@pytest.mark.parametrize("completion,gold,expected", ACCURACY)
def test_accuracy_table(completion, gold, expected):
    assert R.accuracy_reward(completion, gold) == expected


def test_accuracy_reasons():
    assert R._math("no tags", "7") == (0.0, "no_answer_tag")
    assert R._math(tag(""), "7") == (0.0, "empty_answer")
    assert R._math(tag("8"), "7") == (0.0, "wrong_answer")
    assert R._math(tag("5"), "") == (None, "unparseable_gold")
    assert R._math("no tags", "\\frac{") == (None, "unparseable_gold")  # a bad gold is counted even then
    assert R._math(tag("y" * 2000), "\\pi") == (0.0, "answer_too_long")


def test_accuracy_leaves_sigalrm_alone():
    before = signal.getsignal(signal.SIGALRM)
    assert R.accuracy_reward(tag("\\frac{2}{4}"), "\\frac{1}{2}") == 1.0
    assert signal.getsignal(signal.SIGALRM) is before and signal.alarm(0) == 0


def test_accuracy_in_a_thread():
    """math-verify's signal.alarm raises in a non-main thread; the reward must route around it, not fail."""
    out = []
    t = threading.Thread(target=lambda: out.extend([R.accuracy_reward(tag("\\sqrt{4}"), "2"),
                                                    R.accuracy_reward(tag("\\sqrt{5}"), "2")]))
    t.start()
    t.join(120)
    assert out == [1.0, 0.0]


def _number_text(draw_int, commas, decimals):
    s = f"{draw_int:,}" if commas else str(draw_int)
    return s + decimals


@settings(max_examples=150, deadline=None)
@given(st.integers(-10**7, 10**7), st.integers(-10**7, 10**7), st.booleans(), st.booleans(),
       st.sampled_from(["", ".0", ".5", ".25", ".125"]), st.sampled_from(["", ".0", ".5", ".250"]), st.booleans())
def test_fast_path_matches_math_verify(a, b, ca, cb, da, db, same):
    """The cheap exact-number path must decide exactly as math-verify (gold first) would."""
    mv = R._mv()
    gold = _number_text(a, ca, da)
    pred = _number_text(a if same else b, cb, db)
    fast = R._math(tag(pred), gold, cheap_only=True)
    ref = float(mv.verify(mv.parse(f"${gold}$"), mv.parse(f"${pred}$")))
    if fast is not None:
        assert fast[0] == ref, (gold, pred)
    assert R.accuracy_reward(tag(pred), gold) == ref, (gold, pred)
    if not da and not db:
        assert fast is not None  # integers never need sympy


# ----------------------------------------------------------------------------------------------------------------
# format, language, choice, countdown, reasoning-gym

FORMAT = [  # (completion, think_prefilled, expected)
    ("<think>a</think><answer>5</answer>", False, 1.0),
    ("<think>a</think>\n<answer>5</answer>\n", False, 1.0),  # whitespace between and after
    ("  <think>a</think> <answer>5</answer>", False, 1.0),
    ("<think></think><answer>5</answer>", False, 1.0),  # an empty think is still the structure
    ("<think>a</think><answer>5</answer> trailing", False, 0.0),  # nothing after
    ("<think>a</think> so <answer>5</answer>", False, 0.0),  # nothing between
    ("<think>a</think><answer></answer>", False, 0.0),  # empty answer
    ("<think>a</think><answer>  </answer>", False, 0.0),
    ("<answer>5</answer><think>a</think>", False, 0.0),  # order
    ("<think>a</think><answer>5</answer><answer>6</answer>", False, 0.0),  # several answer blocks
    ("<think>a<think>b</think><answer>5</answer>", False, 0.0),
    ("<think>a</think><answer>5", False, 0.0),
    ("a</think><answer>5</answer>", False, 0.0),
    ("a</think><answer>5</answer>", True, 1.0),  # the prompt prefilled <think>
    ("<think>a</think><answer>5</answer>", True, 0.0),  # ... and the model opened it again
    ("", False, 0.0),
]


@pytest.mark.parametrize("completion,prefilled,expected", FORMAT)
def test_format_table(completion, prefilled, expected):
    assert R.format_reward(completion, think_prefilled=prefilled) == expected


LANGUAGE = [  # (text, lang, expected)
    ("I think the answer is simple", "en", 1.0),
    ("我们来计算", "zh", 1.0),
    ("我们 compute", "en", 1 / 3),  # Han counts one word per character
    ("我们 compute", "zh", 2 / 3),
    ("Compute $\\frac{a}{b} = 你好$ and 42 + 17 = 59 `你好` then ```python\nprint('你好')\n``` \\alpha \\(你\\)", "en",
     1.0),  # LaTeX, numbers and code do not count
    ("", "en", 0.0),
    ("42 + 17 = 59", "en", 0.0),  # no words at all
    ("<think>我们</think><answer>the answer</answer>", "zh", 1.0),  # a completion: its think block
    ("我们</think><answer>yes</answer>", "zh", 1.0),  # prefilled <think>
    ("Привет мир, hello", "ru", 2 / 3),
]


@pytest.mark.parametrize("text,lang,expected", LANGUAGE)
def test_language_table(text, lang, expected):
    assert R.language_consistency_reward(text, lang) == pytest.approx(expected)


def test_language_unknown_lang_names_it():
    with pytest.raises(ValueError, match="xx"):
        R.language_consistency_reward("hello", "xx")


CHOICE = [(tag("C"), "C", 1.0), (tag("(C)"), "C", 1.0), (tag("c"), "C", 1.0), (tag("C. 42 grams"), "C", 1.0),
          (tag("\\text{C}"), "C", 1.0), (tag("\\boxed{C}"), "(C)", 1.0), (tag("B"), "C", 0.0),
          (tag("A, C"), "C", 0.0), (tag("AC"), "C", 0.0), (tag("A cat"), "A", 0.0), ("C", "C", 0.0),
          (tag("C"), "CD", None)]


@pytest.mark.parametrize("completion,gold,expected", CHOICE)
def test_choice_table(completion, gold, expected):
    assert R.choice_reward(completion, gold) == expected


COUNTDOWN = [  # (answer, numbers, target, expected, reason)
    ("8/(3-8/3)", [8, 3, 8, 3], 24, 1.0, None),  # exact rational arithmetic
    ("8*3", [8, 3, 5], 24, 1.0, None),  # numbers may go unused
    ("8*3 = 24", [8, 3], 24, 1.0, None),
    ("8*3*1", [8, 3], 24, 0.0, "numbers_misused"),  # 1 was not given
    ("8+8+8", [8, 3], 24, 0.0, "numbers_misused"),  # 8 used three times
    ("2**3*3", [2, 3, 3], 24, 0.0, "bad_expression"),
    ("8//3", [8, 3], 2, 0.0, "bad_expression"),
    ("8/(3-3)", [8, 3, 3], 24, 0.0, "bad_expression"),
    ("__import__('os')", [1], 1, 0.0, "bad_expression"),
    ("", [1], 1, 0.0, "bad_expression"),
    ("8*3", [8, 3], 25, 0.0, "wrong_answer"),
]


@pytest.mark.parametrize("answer,numbers,target,expected,reason", COUNTDOWN)
def test_countdown_table(answer, numbers, target, expected, reason):
    assert R._countdown(tag(answer), numbers, target) == (expected, reason)
    assert R.countdown_reward(tag(answer), numbers, target) == expected


def test_countdown_needs_an_answer():
    assert R._countdown("8*3", [8, 3], 24) == (0.0, "no_answer_tag")


def test_reasoning_gym_passthrough():
    rg = pytest.importorskip("reasoning_gym")
    entry = rg.create_dataset("basic_arithmetic", size=1, seed=1)[0]
    gold = entry["answer"]
    assert R.reasoning_gym_reward(tag(gold), "basic_arithmetic", entry) == 1.0
    partial = R.reasoning_gym_reward(tag("foo " + gold), "basic_arithmetic", entry)
    assert partial == pytest.approx(len(gold) / len("foo " + gold))  # the dataset's own partial credit (P12)
    assert R.reasoning_gym_reward(tag("foo " + gold), "basic_arithmetic", entry, exact=True) == 0.0
    assert R.reasoning_gym_reward("no tags " + gold, "basic_arithmetic", entry) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# code: behaviour


def code(src):
    return f"<think>easy</think><answer>\n```python\n{src}\n```\n</answer>"


INC_TESTS = "assert f(1) == 2\nassert f(2) == 3\nassert f(3) == 5"


def test_code_pass_partial_binary():
    assert R.code_reward(code("def f(x):\n    return x + 1"), "assert f(1) == 2\nassert f(5) == 6") == 1.0
    assert R.code_reward(code("def f(x):\n    return x + 1"), INC_TESTS) == pytest.approx(2 / 3)
    assert R.code_reward(code("def f(x):\n    return x + 1"), INC_TESTS, binary=True) == 0.0


def test_code_humaneval_check_is_inlined():
    tests = "METADATA = {}\n\ndef check(candidate):\n    assert candidate(1) == 2\n    assert candidate(2) == 3\n" \
            "    assert candidate(3) == 5\n\ncheck(inc)\n"
    units = R.split_tests(tests, entry_point="inc")
    assert [c for _, c in units] == [False, False, True, True, True]
    assert R.code_reward(code("def inc(x):\n    return x + 1"), tests, entry_point="inc") == pytest.approx(2 / 3)
    assert R.code_reward(code("def inc(x):\n    return x + 1"), tests) == 0.0  # no inlining: one failing check


def test_code_setup_statements_and_last_block():
    tests = "import math\ny = f(4)\nassert y == 5\nassert math.isclose(f(0.5), 1.5)"
    completion = "```python\ndef f(x):\n    return 0\n```\nbetter:\n```python\ndef f(x):\n    return x + 1\n```"
    assert R.code_reward(completion, tests) == 1.0


CODE_ZERO = [  # (completion, tests, reason)
    ("no code here", INC_TESTS, "no_code"),
    (code("def f(x) return x"), INC_TESTS, "syntax_error"),
    (code("raise ValueError('no')\ndef f(x):\n    return x + 1"), INC_TESTS, "exception"),
    (code("def f(x):\n    return x"), INC_TESTS, "tests_failed"),
    # the model's code patches the builtins the harness would use: the harness kept its own
    (code("import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n"
          "def f(x):\n    return 0"), INC_TESTS, "tests_failed"),
]


@pytest.mark.parametrize("completion,tests,reason", CODE_ZERO)
def test_code_zero_table(completion, tests, reason):
    assert R._code(completion, tests, timeout=2.0) == (0.0, reason)


def test_code_bad_tests_are_skipped():
    assert R._code(code("def f(x):\n    return x"), "assert (", timeout=2.0) == (None, "bad_tests")
    assert R._code(code("def f(x):\n    return x"), "import os\nx = 1", timeout=2.0) == (None, "bad_tests")
    assert R._code(code("def f(x):\n    return x"), INC_TESTS, 2.0, False, "not valid") == (None, "bad_tests")


def test_code_can_use_libraries_and_its_own_dir():
    src = ("import numpy as np, json\nopen('scratch.json', 'w').write(json.dumps([1, 2]))\n"
           "def f():\n    return int(np.asarray(json.load(open('scratch.json'))).sum())")
    assert R.code_reward(code(src), "assert f() == 3", timeout=5.0) == 1.0


@pytest.mark.skipif(not ROOT, reason="the fresh uid exists only in root mode")
def test_code_runs_as_a_fresh_uid():
    assert R.code_reward(code("import os\ndef f():\n    return os.getuid()"),
                         f"assert f() > {sandbox_runner.UID_BASE}") == 1.0


# ----------------------------------------------------------------------------------------------------------------
# code: the tests run in the supervisor and call the model's functions through proxies (plain data both ways)


def test_code_exceptions_cross_as_their_builtin_type():
    """A builtin exception is raised again in the judge (try/except and raises-style tests work); the model's own
    exception classes arrive as ModelRaised, an Exception named after them."""
    src = ("class Bad(Exception):\n    pass\ndef f(x):\n    if x < 0:\n        raise ValueError('negative')\n"
           "    if x == 0:\n        raise Bad()\n    return x")
    tests = ("try:\n    f(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no raise')\n"
             "try:\n    f(0)\nexcept Exception as e:\n"
             "    assert type(e).__name__ == 'ModelRaised' and str(e) == 'Bad'\n"
             "else:\n    raise AssertionError('no raise')\n"
             "assert f(2) == 2\nassert f(-1) == -1")
    assert R.code_reward(code(src), tests) == pytest.approx(3 / 4)


def test_code_values_cross_as_plain_data():
    src = ("import numpy as np\nLIMIT = {'a': [1, 2.5]}\n"
           "def f():\n    return (1, 2.5, 'a', b'b', None, True, 1j, {1: [2]}, {3}, frozenset({4}), float('nan'))\n"
           "def g():\n    return np.int64(3), np.float64(0.5), np.array([1, 2])\n"
           "def h(xs, key=None):\n    xs.append(key)\n    return xs\n")
    tests = ["r = f()",
             "assert r[:10] == (1, 2.5, 'a', b'b', None, True, 1j, {1: [2]}, {3}, frozenset({4}))",
             "assert [type(v) for v in r[:6]] == [int, float, str, bytes, type(None), bool] and r[10] != r[10]",
             "assert g() == (3, 0.5, [1, 2])",  # numpy values arrive as their .tolist()
             "assert LIMIT == {'a': [1, 2.5]}",  # a plain-data global is copied once
             "assert h([], key=7) == [7]",
             "xs = []\nh(xs)\nassert xs == []"]  # arguments are copies: the caller never sees the mutation
    assert R._code(code(src), "\n".join(tests), timeout=5.0) == (1.0, None)


def test_code_what_cannot_cross_fails_the_test():
    """An object of the model's class, an argument that is not plain data: that test fails, with a reason, even
    if the test catches the complaint."""
    src = "class Stack:\n    pass\ndef apply(fn, x):\n    return fn(x)\ndef inc(x):\n    return x + 1"
    assert R._code(code(src), "s = Stack()\nassert s is not None") == (0.0, "not_plain")
    assert R._code(code(src), "try:\n    Stack()\nexcept BaseException:\n    pass") == (0.0, "not_plain")
    assert R._code(code(src), "assert apply(lambda x: x + 1, 1) == 2") == (0.0, "bad_args")
    assert R._code(code(src), "assert apply(lambda x: x + 1, 1) == 2\nassert inc(1) == 2") == (0.5, None)


def test_code_a_hung_function_fails_the_remaining_tests():
    src = "def g():\n    return 1\ndef f():\n    while True:\n        pass"
    for middle in ("assert f() == 1", "try:\n    f()\nexcept BaseException:\n    pass"):  # swallowing does not help
        t0 = time.monotonic()
        value, reason = R._code(code(src), f"assert g() == 1\n{middle}\nassert g() == 1", timeout=TIMEOUT)
        assert value == pytest.approx(1 / 3) and time.monotonic() - t0 < TIMEOUT + 5
    assert R._code(code(src), "assert f() == 1\nassert g() == 1", timeout=TIMEOUT) == (0.0, "timeout")


def test_replies_are_checked_before_marshal_loads_them():
    """Only marshal version 2 (no back-references) of plain data gets to marshal.loads, lengths checked."""
    values = [None, True, -5, 2 ** 70, -2 ** 40, 1.5, float("inf"), 1j, "é", b"\x00", (), (1, "a"), [[0] * 3] * 3,
              {1: {"k": (2, 3)}}, {1, 2}, frozenset({3}), ("ok", list(range(1000)))]
    for v in values:
        sandbox_runner._check_marshal(marshal.dumps(v, 2))
    bad = [MARSHAL_CRASHER, marshal.dumps(("ok", "x" * 10)), marshal.dumps(compile("1", "<x>", "eval"), 2),
           marshal.dumps([1, 2], 2)[:-1], marshal.dumps([1, 2], 2) + b"N", b"[\xff\xff\xff\x7f",
           b"u\xff\xff\xff\xff", b"", b".", b"{" * 200 + b"0" * 200]
    for data in bad:
        with pytest.raises(ValueError):
            sandbox_runner._check_marshal(data)


def test_code_builtin_names_mean_the_builtin():
    src = "def len(x):\n    return 3\ndef f():\n    return []"
    assert R._code(code(src), "assert len(f()) == 0") == (1.0, None)


def test_code_tests_may_print():
    """The tests run in the supervisor, whose stdout carries the verdict: their output must not garble it."""
    tests = "print('1 - uid+ns')\nprint('x' * 100000)\nassert f() == 1"
    assert R.code_reward(code("def f():\n    return 1"), tests) == 1.0
    assert R.code_reward(code("def f():\n    return 2"), tests) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------------------------
# code: isolation, and the refusal to run without it


def test_sandbox_reports_its_isolation():
    bits, reason, isolation = R.run_sandboxed("def f():\n    return 1", ["assert f() == 1"])
    assert (bits, reason) == ("1", None)
    if ROOT:
        assert isolation == ("uid+ns" if own_namespaces() else "uid")
    else:
        assert isolation == "userns"  # else it refused: see test_code_refuses_without_isolation


def test_code_refuses_without_isolation(monkeypatch):
    """Neither root nor a user namespace (forced): the code reward raises, once, naming what is missing and how
    to accept weak isolation knowingly; it is never a silent 0. With isolation="weak" it runs."""
    monkeypatch.setenv(R.PRETEND_ENV, "no_isolation")
    good = code("def f():\n    return 1")
    with pytest.raises(R.SandboxUnavailable, match="refused a user namespace") as e:
        R.code_reward(good, "assert f() == 1")
    assert "not to be root" in str(e.value) and "isolation='weak'" in str(e.value)
    assert isinstance(e.value, RuntimeError) and pickle.loads(pickle.dumps(e.value)).args == e.value.args  # pools
    with pytest.raises(R.SandboxUnavailable):
        R.run_sandboxed("def f():\n    return 1", ["assert f() == 1"])
    examples = [Ex("q", "", "code", {"tests": "assert f() == 1"})] * 3
    with pytest.raises(R.SandboxUnavailable):
        R.score_batch([good] * 3, examples, workers=0)
    # an entry point prints it as one line naming the flag (exit 2), not a traceback
    import config

    def main():
        R.score_batch([good] * 3, examples, workers=0)
    with pytest.raises(SystemExit) as ex:
        config.cli(main, "grpo.py")
    assert ex.value.code == 2
    assert R.run_sandboxed("def f():\n    return 1", ["assert f() == 1"], isolation="weak") == ("1", None, "none")
    assert R.code_reward(good, "assert f() == 1", isolation="weak") == 1.0
    assert R.score_batch([good] * 3, examples, workers=0, code_isolation="weak")[1]["accuracy"] == [1.0] * 3
    with pytest.raises(ValueError, match="isolation='none'"):
        R.code_reward(good, "assert f() == 1", isolation="none")
    with pytest.raises(ValueError, match="code_isolation"):
        R.score_batch([good], examples[:1], workers=0, code_isolation="off")


NOBODY = 65534
AS_NOBODY = """import os, sys
sys.path.insert(0, sys.argv[1])
import rewards as R
victim = sys.argv[2]
attack = ("import ctypes\\nlibc = ctypes.CDLL(None)\\nr = libc.unlink(%r)\\nfd = libc.open(%r, 1 | 512)\\n"
          "def f():\\n    return int(r == 0 or fd >= 0)") % (victim.encode(), victim.encode())
peek = ("import os\\nn, me = 0, os.readlink('/proc/self')\\nfor p in filter(str.isdigit, os.listdir('/proc')):\\n"
        "    try:\\n        if p != me and b'sandbox_runner._supervise' in open(f'/proc/{p}/cmdline', 'rb').read():\\n"
        "            open(f'/proc/{p}/mem', 'rb').close()\\n            n += 1\\n    except OSError:\\n        pass\\n"
        "def f():\\n    return n")
try:
    print(R.run_sandboxed("def f():\\n    return 1", ["assert f() == 1"]), R.run_sandboxed(attack, ["assert f() == 1"]))
except R.SandboxUnavailable:
    print("refused")
os.environ[R.PRETEND_ENV] = "no_isolation"  # weak: same uid as the judge, which must still be out of reach
print(R.run_sandboxed(peek, ["assert f() == 0"], isolation="weak"))
"""


@pytest.mark.skipif(not ROOT or not shutil.which("setpriv") or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs root (to become an unprivileged uid), setpriv and a system python")
def test_sandbox_as_an_unprivileged_uid():
    """For real, not pretended: as an unprivileged uid the code runs in a user namespace (or the reward refuses),
    and cannot delete or truncate a file of that uid outside its directory, even through ctypes."""
    repo = os.path.dirname(os.path.abspath(R.__file__))
    home = tempfile.mkdtemp(prefix="nano_r1_nobody_")
    victim = os.path.join(home, "keep.txt")
    with open(victim, "w") as f:
        f.write("precious")
    for path in (home, victim):
        os.chown(path, NOBODY, NOBODY)
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3"]
    try:
        if subprocess.run(cmd + ["-c", f"import os; open({repo + '/rewards.py'!r}).close()"], env={},
                          capture_output=True).returncode != 0:
            pytest.skip("the unprivileged uid cannot run the system python or read the repository")
        script = os.path.join(home, "as_nobody.py")  # a file: the peek must not find our own command line
        with open(script, "w") as f:
            f.write(AS_NOBODY)
        out = subprocess.run(cmd + [script, repo, victim], env={"HOME": home}, capture_output=True, text=True,
                             timeout=120, cwd=home)
        lines = out.stdout.splitlines()
        assert out.returncode == 0 and len(lines) == 2, out.stderr[-3000:]
        assert lines[0] in ("refused", "('1', None, 'userns') ('0', None, 'userns')"), lines[0]
        assert lines[1] == "('1', None, 'none')", lines[1]
        with open(victim) as f:
            assert f.read() == "precious"
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# code: the attack suite. Each case must score 0 within timeout + a few seconds; afterwards the trainer (this
# process and a stand-in child of it) is alive, no process the sandbox started is left, the outside file is intact.

TIMEOUT = 1.5
SECRET = "nano-r1-test-secret-7f3a"
LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"


@pytest.fixture(scope="module")
def world():
    """A world-readable file outside the sandbox, a stand-in trainer process, a secret in our environment and a
    listening socket."""
    d = tempfile.mkdtemp(prefix="nano_r1_outside_")
    os.chmod(d, 0o755)
    path = os.path.join(d, "keep.txt")
    with open(path, "w") as f:
        f.write("precious")
    os.chmod(path, 0o644)
    os.environ["NANO_R1_TEST_SECRET"] = SECRET
    sentinel = subprocess.Popen(["sleep", "600"])
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    yield {"path": path, "dir": d, "port": srv.getsockname()[1], "sentinel": sentinel}
    srv.close()
    sentinel.kill()
    sentinel.wait()
    os.environ.pop("NANO_R1_TEST_SECRET", None)
    shutil.rmtree(d, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def own_namespaces():
    """Does the sandbox get its own pid (and network) namespace here? Its code is then pid 1."""
    return R.code_reward(code("import os\ndef f():\n    return os.getpid()"), "assert f() == 1") == 1.0


@functools.lru_cache(maxsize=None)
def isolation_in(mode):
    """The isolation the supervisor achieves in a test mode: "default", or "no_root" (as root, pretend not to be:
    the user-namespace path, with the trainer's uid outside)."""
    old = os.environ.pop(R.PRETEND_ENV, None)
    try:
        if mode == "no_root":
            os.environ[R.PRETEND_ENV] = "no_root"
        return R.run_sandboxed("def f():\n    return 1", ["assert f() == 1"])[2]
    finally:
        os.environ.pop(R.PRETEND_ENV, None)
        if old is not None:
            os.environ[R.PRETEND_ENV] = old


def test_sandbox_uses_namespaces_when_the_kernel_allows():
    flags = sandbox_runner.CLONE_NEWPID | sandbox_runner.CLONE_NEWNET | (0 if ROOT else sandbox_runner.CLONE_NEWUSER)
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare({flags}) != 0)"
    allowed = subprocess.run([sys.executable, "-c", probe]).returncode == 0
    assert own_namespaces() == allowed


def leftovers(marker="987.654"):
    """Processes the sandbox may have left: its uid range (root mode), the marker in a command line, a runner."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = int(f.read().split("Uid:")[1].split()[0])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if uid >= sandbox_runner.UID_BASE or marker in cmd or "sandbox_runner._supervise()" in cmd:
            found.append((pid, uid, cmd))
    return found


def attacks(w):
    p, d, port = w["path"], w["dir"], w["port"]
    detach = (LIBC + "import time\nfor _ in range(3):\n    if libc.fork() == 0:\n        libc.setsid()\n"
              "        if libc.fork() == 0:\n            argv = (ctypes.c_char_p * 3)(b'sleep', b'987.654', None)\n"
              "            libc.execv(b'/bin/sleep', argv)\n        libc._exit(0)\ntime.sleep(100)\n"
              "def f():\n    return 1\n")
    return {  # name: (code, acceptable reasons, needs: None | "uid" (a fresh uid) | "ns" (own pid+net namespaces)
        # [, test source]: "assert f() == 1" unless given
        "infinite_loop": ("while True:\n    pass", {"timeout"}, None),
        "sleep_forever": ("import time\ntime.sleep(1000)", {"timeout"}, None),
        "detached_grandchildren": (detach, {"timeout"}, None),
        "python_fork": ("import os\nos.fork()\ndef f():\n    return 1", {"exception"}, None),
        "fork_bomb": (LIBC + "while True:\n    libc.fork()", {"timeout"}, "uid"),  # RLIMIT_NPROC binds a fresh uid
        "multi_gb_allocation": ("x = bytearray(8 << 30)\ndef f():\n    return 1", {"memory"}, None),
        "growing_allocation": ("x = []\nwhile True:\n    x.append(bytearray(64 << 20))", {"memory", "timeout"},
                               None),  # page-faulting the memory in may take longer than TIMEOUT on a busy box
        "sys_exit_before_tests": ("import sys\nsys.exit(0)\ndef f():\n    return 1", {"exit_before_tests"}, None),
        "os_exit_before_tests": ("import os\nos._exit(0)\ndef f():\n    return 1", {"exit_before_tests"}, None),
        "fake_marker": ("import os\nfor fd in range(0, 64):\n    try:\n"
                        "        os.write(fd, b'0123456789abcdef0123456789abcdef 1 -\\nALL TESTS PASSED\\n')\n"
                        "    except OSError:\n        pass\nprint('ALL TESTS PASSED')\ndef f():\n    return 1\n"
                        "os._exit(0)", {"bad_reply", "exit_before_tests"}, None),
        "huge_print": ("print('x' * (64 << 20))\ndef f():\n    return 1", {"output_limit"}, None),
        "print_flood": ("while True:\n    print('y' * 10000)", {"output_limit"}, None),
        "delete_outside": (f"import os\nos.remove({p!r})\ndef f():\n    return 1", {"exception"}, None),
        "truncate_outside": (f"open({p!r}, 'w').close()\ndef f():\n    return 1", {"exception"}, None),
        "rmtree_outside": (f"import shutil\nshutil.rmtree({d!r})\ndef f():\n    return 1", {"exception"}, None),
        "delete_outside_ctypes": (LIBC + f"r = libc.unlink({p!r}.encode())\nt = libc.truncate({p!r}.encode(), 0)\n"
                                  "fd = libc.open(%r.encode(), 1 | 512)\ndef f():\n    return int(r == 0 or t == 0 or "
                                  "fd >= 0)" % p, {"tests_failed"}, None),  # fresh uid, or read-only mounts
        "read_trainer_env": ("import os\nleak = os.environ.get('NANO_R1_TEST_SECRET', '')\n"
                             "for pid in os.listdir('/proc'):\n    try:\n"
                             f"        leak = leak or ({SECRET!r} in open(f'/proc/{{pid}}/environ', errors='ignore').read())\n"
                             "    except OSError:\n        pass\ndef f():\n    return int(bool(leak))",
                             {"tests_failed"}, None),
        "kill_trainer": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef f():\n    return 1",
                         {"exception"}, None),
        # Fires only when contained: in its own pid namespace (pid 1) or as a non-root uid. kill(-1) returns 0
        # even when every target refused, so harm is judged outside: the stand-in trainer process must live.
        "kill_everything_ctypes": (LIBC + "import os\nassert os.getpid() == 1 or os.getuid() != 0\n"
                                   "libc.kill(-1, 9)\nppid = os.getppid()\n"
                                   "q = libc.kill(ppid, 9) if ppid > 1 else -1\n"
                                   "def f():\n    return int(q == 0)", {"tests_failed"}, "ns"),
        "socket": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                   "def f():\n    return 1", {"exception"}, None),
        "socket_raw": (f"import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\ns.settimeout(1)\n"
                       f"s.connect(('127.0.0.1', {port}))\ndef f():\n    return 1", {"exception"}, "ns"),
        # -- gaming the verdict: each of these scored 1.0 when the tests ran in the model's own interpreter
        "always_equal": ("class A:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return A()",
                         {"not_plain"}, None, "assert add(1, 2) == 3"),
        "lying_int": ("class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
                      "def f():\n    return I(0)", {"tests_failed"}, None),
        "lying_str": ("class S(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
                      "def f():\n    return S('no')", {"tests_failed"}, None),
        "lying_list": ("class L(list):\n    def __eq__(self, other):\n        return True\ndef f():\n    return L()",
                       {"tests_failed"}, None),
        "forge_verdict": (FORGE, {"bad_reply", "exit_before_tests"}, None),
        # the verdict travels in a pipe the trainer (this process) reads: its end is in /proc/<pid>/fd
        "forge_via_trainer_pipe": ("import os, _io\nhits = 0\ntry:\n"
                                   f"    for fd in os.listdir('/proc/{os.getpid()}/fd'):\n"
                                   f"        path = '/proc/{os.getpid()}/fd/' + fd\n        try:\n"
                                   "            if os.readlink(path).startswith('pipe:'):\n"
                                   "                _io.FileIO(path, 'w').write(b'1 - uid+ns\\n')\n"
                                   "                hits += 1\n        except OSError:\n            pass\n"
                                   "except OSError:\n    pass\ndef f():\n    return 0", {"tests_failed"}, None),
        "read_tests_from_memory": (PEEK, {"tests_failed"}, None),
        "patch_builtins": ("import builtins\nclass Never(BaseException):\n    pass\nbuiltins.AssertionError = Never\n"
                           "builtins.len = lambda x: 3\nbuiltins.isinstance = lambda *a: True\n"
                           "builtins.exec = builtins.compile = lambda *a, **k: None\n"
                           "AssertionError = Never\ndef len(x):\n    return 3\ndef isinstance(*a):\n    return True\n"
                           "def f():\n    return []", {"tests_failed", "bad_reply"}, None,  # its own replies break
                           "assert len(f()) == 3 and isinstance(f(), dict)"),
        # -- the model's function misbehaves while the judge waits for it
        "hang_in_call": ("def f():\n    while True:\n        pass", {"timeout"}, None),
        "sleep_in_call": ("import time\ndef f():\n    time.sleep(100)", {"timeout"}, None),
        "flood_in_call": ("def f():\n    print('x' * (64 << 20))\n    return 1", {"output_limit"}, None),
        "huge_reply": ("def f():\n    return 'x' * (32 << 20)", {"bad_reply"}, None),
        "exit_in_call": ("import os\ndef f():\n    os._exit(0)", {"died"}, None),
        "raises": ("def f():\n    raise ValueError('no')", {"tests_failed"}, None),
        "raises_system_exit": ("def f():\n    raise SystemExit(0)", {"tests_failed"}, None),
        "returns_a_function": ("def f():\n    return f", {"not_plain"}, None),
        # -- speaking the pipe protocol by hand: whatever arrives is checked
        "reply_code_object": (RAW_REPLY + "send(('ok', compile('1', '<x>', 'eval')))\n    os._exit(0)", {"bad_reply"},
                              None),
        "reply_dag_bomb": (RAW_REPLY + "x = 1\n    for _ in range(80):\n        x = [x, x]\n"
                           "    send(('ok', x))\n    os._exit(0)", {"bad_reply"}, None),
        "reply_marshal_crasher": (RAW_REPLY + f"data = {MARSHAL_CRASHER!r}\n"
                                  "    os.write(3, len(data).to_bytes(4, 'little') + data)\n    os._exit(0)",
                                  {"bad_reply"}, None),  # the judge must live to say so
        "reply_garbage": (RAW_REPLY + "os.write(3, b'\\x05\\x00\\x00\\x00\\xff\\xfe\\xfd\\xfc\\xfb')\n    os._exit(0)",
                          {"bad_reply"}, None),
        # -- the judge holds the tests: it must be out of reach
        "read_judge_memory": ("import os\nme, opened = os.readlink('/proc/self'), 0\nfor pid in os.listdir('/proc'):\n"
                              "    if pid.isdigit() and pid != me:\n        try:\n"
                              "            open(f'/proc/{pid}/mem', 'rb').close()\n            opened += 1\n"
                              "        except OSError:\n            pass\ndef f():\n    return int(opened > 0)",
                              {"tests_failed"}, None),
        "kill_judge_ctypes": (LIBC + "import os\nkilled = 0\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n"
                              "    try:\n        cmd = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
                              "    except OSError:\n        continue\n"
                              "    if b'sandbox_runner._supervise' in cmd and libc.kill(int(pid), 9) == 0:\n"
                              "        killed += 1\n"
                              "def f():\n    return int(killed > 0)", {"tests_failed"}, None),
    }


# Finds the old harness's nonce in the frames above it or anywhere the garbage collector sees, writes a fake
# verdict (old and new format) to every descriptor, and exits before any test could fail.
FORGE = r"""import gc, os, re, sys
found = set()
frame = sys._getframe()
while frame:
    found.update(v for v in frame.f_locals.values() if isinstance(v, str))
    frame = frame.f_back
for obj in gc.get_objects():
    items = list(obj.values()) if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    found.update(v for v in items if isinstance(v, str))
nonces = [v for v in found if re.fullmatch('[0-9a-f]{32}', v)] + ['0' * 32]
for fd in range(64):
    for n in nonces:
        try:
            os.write(fd, f'{n} 1 -\n1 - uid+ns\n'.encode())
        except OSError:
            pass
os._exit(0)
"""

# Looks for the tests' own source in its memory and returns the value they expect.
PEEK = r"""import gc, re, sys
pool = []
frame = sys._getframe()
while frame:
    pool.append(frame.f_locals)
    frame = frame.f_back
pool += gc.get_objects()
answer = 0
for obj in pool:
    items = list(obj.values()) if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for v in items:
        for s in (v if isinstance(v, (list, tuple)) else [v]):
            m = isinstance(s, str) and re.search('assert f[(][)] == ([0-9]+)', s)
            if m:
                answer = int(m.group(1))
def f():
    return answer
"""

# 100 bytes that make CPython 3.11's marshal.loads segfault (a back-reference to a tuple still being built, hashed)
MARSHAL_CRASHER = bytes.fromhex(
    "a902da026f6ba80a000000e901000000e70000000000000440da0161f301000000624e54f90000000000000000000000"
    "000000f03f7b7202000000a902e902000000e903000000303c0100000072090000003e01000000d704000000")

# f answers the judge's call itself, with raw bytes on the reply descriptor
RAW_REPLY = """import marshal, os
def send(msg):
    data = marshal.dumps(msg)
    os.write(3, len(data).to_bytes(4, 'little') + data)
def f():
    """


ATTACK_NAMES = list(attacks({"path": "", "dir": "", "port": 0}))


@pytest.mark.parametrize("name", ATTACK_NAMES)
@pytest.mark.parametrize("mode", ["default", "no_root"])
def test_sandbox_attack(world, name, mode, monkeypatch):
    src, reasons, needs, *tests = attacks(world)[name]
    if mode == "no_root":
        if not ROOT:
            pytest.skip("the default mode is the no-root mode here")
        monkeypatch.setenv(R.PRETEND_ENV, "no_root")
    isolation = isolation_in(mode)
    if needs == "uid" and not isolation.startswith("uid") or needs == "ns" and isolation not in ("uid+ns", "userns"):
        pytest.skip(f"bypasses the Python guards; without {needs} no wall would stop it and it would do harm")
    seen = []  # processes with the marker seen while the attack ran (proves the detach attack really detached)
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.extend(x for x in leftovers() if "987.654" in x[2])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.monotonic()
    try:
        value, reason = R._code(code(src), tests[0] if tests else "assert f() == 1", timeout=TIMEOUT, memory_mb=512)
    finally:
        done.set()
        watcher.join()
    elapsed = time.monotonic() - t0
    assert value == 0.0 and reason in reasons, (value, reason)
    assert elapsed < TIMEOUT + 5, elapsed
    if name == "detached_grandchildren":
        assert seen, "the attack never started its detached sleepers: the test proves nothing"
    assert leftovers() == []
    with open(world["path"]) as f:
        assert f.read() == "precious"
    assert world["sentinel"].poll() is None  # the stand-in trainer process survived
    assert os.environ["NANO_R1_TEST_SECRET"] == SECRET


def test_sandbox_env_is_cleared(world):
    src = "import os\ndef f():\n    return sorted(os.environ)"
    assert R.code_reward(code(src), "assert 'NANO_R1_TEST_SECRET' not in f() and 'PATH' in f()") == 1.0


# ----------------------------------------------------------------------------------------------------------------
# fuzz: no reward raises, values stay in [0, 1]

texts = st.one_of(st.text(max_size=200), st.builds(lambda a, b: f"<think>{a}</think><answer>{b}</answer>",
                                                   st.text(max_size=60), st.text(max_size=60)),
                  st.builds(lambda a: f"\\boxed{{{a}}}", st.text(max_size=60)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts, st.sampled_from(["42", "\\frac{1}{2}", "x = 5", "C", "2\\pi"]))
def test_fuzz_rewards_never_raise(text, gold):
    for v in (R.accuracy_reward(text, gold), R.format_reward(text), R.format_reward(text, True),
              R.language_consistency_reward(text, "en"), R.language_consistency_reward(text, "zh"),
              R.choice_reward(text, "C"), R.countdown_reward(text, [1, 2, 3], 6)):
        assert v is not None and 0.0 <= v <= 1.0


@settings(max_examples=8, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_code_reward_never_raises(text):
    for completion in (text, code(text)):
        v = R.code_reward(completion, "assert f(1) == 2", timeout=2.0)
        assert 0.0 <= v <= 1.0


# ----------------------------------------------------------------------------------------------------------------
# score_batch


def batch():
    return [
        (tag("42"), Ex("q", "42")),
        (tag("41"), Ex("q", "42")),
        (tag("\\frac{2}{4}"), Ex("q", "\\frac{1}{2}")),
        ("no tags at all", Ex("q", "7")),
        (tag("5"), Ex("q", "")),  # unparseable gold
        (tag("(B)"), Ex("q", "B", "choice")),
        (tag("8*3"), Ex("q", "", "countdown", {"numbers": [8, 3], "target": 24})),
        (code("def f(x):\n    return x + 1"), Ex("q", "", "code", {"tests": INC_TESTS})),
        (code("while True:\n    pass"), Ex("q", "", "code", {"tests": INC_TESTS})),
        ("<think>我们 think</think><answer>42</answer>", Ex("q", "42", "math", {"lang": "zh"})),
    ]


def test_score_batch_components_totals_and_reasons():
    completions, examples = map(list, zip(*batch()))
    total, comps, reasons = R.score_batch(completions, examples, workers=2, code_timeout=TIMEOUT)
    acc = comps["accuracy"]
    assert acc == pytest.approx([1.0, 0.0, 1.0, 0.0, None, 1.0, 1.0, 2 / 3, 0.0, 1.0])
    assert comps["format"] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert comps["language"] == [None] * len(acc)  # not weighted, not computed
    assert total == pytest.approx([(a or 0.0) + f for a, f in zip(acc, comps["format"])])
    assert reasons == {"wrong_answer": 1, "no_answer_tag": 1, "unparseable_gold": 1, "timeout": 1, "bad_format": 1}
    # the same numbers in this process, and with the language reward added directly
    total0, comps0, reasons0 = R.score_batch(completions, examples, workers=0, code_timeout=TIMEOUT)
    assert comps0 == comps and reasons0 == reasons and total0 == total
    w = {"accuracy": 1.0, "format": 1.0, "language": 1.0}
    total_l, comps_l, _ = R.score_batch(completions, examples, w, workers=2, code_timeout=TIMEOUT)
    assert comps_l["language"][-1] == pytest.approx(2 / 3)  # target zh from the example's meta
    assert comps_l["language"][0] == 1.0
    assert total_l == pytest.approx([t + l for t, l in zip(total, comps_l["language"])])
    w = {"accuracy": 2.0, "format": 0.5}
    total_w, _, _ = R.score_batch(completions, examples, w, workers=0, code_timeout=TIMEOUT)
    assert total_w == pytest.approx([2 * (a or 0.0) + 0.5 * f for a, f in zip(acc, comps["format"])])


def test_score_batch_reasoning_gym():
    pytest.importorskip("reasoning_gym")
    entry = {"question": "1+1", "answer": "2", "metadata": {}}
    examples = [Ex("q", "2", "rg", {"rg_name": "basic_arithmetic", "rg_entry": entry})] * 3
    for workers in (0, 2):
        _, comps, reasons = R.score_batch([tag("2"), tag("the sum is 2"), tag("3")], examples, workers=workers,
                                          rg_exact=True)
        assert comps["accuracy"] == [1.0, 0.0, 0.0] and reasons == {"wrong_answer": 2}


def test_score_batch_bad_input_names_it():
    with pytest.raises(ValueError, match="accuracy_weight"):
        R.score_batch([tag("1")], [Ex("q", "1")], {"accuracy_weight": 1.0}, workers=0)
    with pytest.raises(ValueError, match="'poetry'"):
        R.score_batch([tag("1")], [Ex("q", "1", "poetry")], workers=0)
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        R.score_batch([tag("1"), tag("2")], [Ex("q", "1")], workers=0)


def test_score_batch_prefilled_think():
    total, comps, _ = R.score_batch(["reasoning</think><answer>3</answer>"], [Ex("q", "3")], workers=0,
                                    think_prefilled=True)
    assert comps["format"] == [1.0] and total == [2.0]


def test_score_batch_from_a_thread():
    """The GRPO loop may score in a background thread (overlapping rollout): math-verify must still be safe."""
    out = []
    completions = [tag("\\frac{2}{4}"), tag("\\frac{3}{4}"), tag("7")]
    examples = [Ex("q", "\\frac{1}{2}"), Ex("q", "\\frac{1}{2}"), Ex("q", "7")]
    for workers in (0, 2):
        t = threading.Thread(target=lambda: out.append(R.score_batch(completions, examples, workers=workers)[1]))
        t.start()
        t.join(120)
    assert [c["accuracy"] for c in out] == [[1.0, 0.0, 1.0]] * 2


def test_reversed_notation_golds_compare_as_exact_text():
    """The toy writes ninety as "09": math-verify would read it as 9 and accept "9"."""
    from dataclasses import dataclass, field

    @dataclass
    class Ex:
        prompt: str
        answer: str
        kind: str = "math"
        meta: dict = field(default_factory=lambda: {"notation": "reversed"})
    ex = Ex("54+54", "09")
    done = lambda a: f"<think>54+54=09</think><answer>{a}</answer>"  # noqa: E731
    _, comps, _ = R.score_batch([done("09"), done("9"), done("90"), done(" 09 "), "09"], [ex] * 5, workers=0)
    assert comps["accuracy"] == [1.0, 0.0, 0.0, 1.0, 0.0]
