"""Rule rewards for R1-Zero-style RL (the paper's section 2), and the launcher of the code sandbox.

Every reward is a function of (completion text, gold) that never raises on a bad completion: it scores 0 and
score_batch counts why. R1-Zero's reward is accuracy + format with equal weights (the supplementary's Eq. B4);
language consistency (R1's second RL stage) is added when enabled. An unparseable gold gives None (skip), never 1
(PITFALLS P12). Model-written code runs in the sandbox's walled child (sandbox_runner.py lists the walls, the
proxies' semantics and the limits), the tests outside it against proxies of its functions; without root or a user
namespace the code reward raises SandboxUnavailable (never a silent 0) unless the caller accepts isolation="weak".
score_batch is the one call per GRPO step: dispatch by kind, weighted total, per-component values, counted reasons.
"""
import ast
import atexit
import builtins
import collections
import marshal
import multiprocessing as mp
import operator
import os
import re
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from functools import lru_cache

from config import UserError

MV_TIMEOUT = 3            # seconds per math-verify parse/compare (signal.alarm counts whole seconds)
MAX_ANSWER_CHARS = 1000   # longer "answers" are spam, and they make sympy slow
WEIGHTS = {"accuracy": 1.0, "format": 1.0}  # the paper's R1-Zero reward; add "language": 1.0 to enable it
KINDS = ("math", "choice", "countdown", "code", "rg")

# ----------------------------------------------------------------------------------------------------------------
# answer extraction


def last_boxed(text):
    """Content of the last \\boxed{...} (balanced braces), or None (no \\boxed, no brace after it, unbalanced)."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = len(text) - len(text[i + 6:].lstrip(" "))  # the first non-space after \\boxed
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k] if text[j] == "{" else None
    return None


def extract_answer(completion, answer_block=False):
    """The last <answer>...</answer> block (its last \\boxed{} if it has one), else the last \\boxed{...}, else None.
    answer_block: the format asks for the answer block, so no block means no answer (a \\boxed{} inside <think> or
    in a truncated output is not one)."""
    i = completion.rfind("<answer>")
    j = completion.find("</answer>", i) if i >= 0 else -1
    if j >= 0:
        ans = completion[i + 8:j]
        box = last_boxed(ans)
        return (ans if box is None else box).strip()
    box = None if answer_block else last_boxed(completion)
    return None if box is None else box.strip()


_NUM = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _number(s):
    """Exact value of a plain number ("1,234", "-0.5", "$7$", "3."), or None."""
    s = str(s).strip().strip("$").strip().rstrip(".")
    return Fraction(s.replace(",", "")) if _NUM.fullmatch(s) else None


def _squash(s):
    return re.sub(r"\s+", "", str(s)).strip("$").rstrip(".")


class SandboxUnavailable(RuntimeError, UserError):
    """No root and no user namespace, and the caller did not accept weaker isolation: raised, never a reward. The
    message says how to fix it or pass --code-isolation=weak; entry points print it as one line."""


def _safe(fn, *args):
    """Run a scorer; any failure (math-verify's TimeoutException is a BaseException) becomes 0 with a reason."""
    try:
        return fn(*args)
    except (KeyboardInterrupt, SystemExit, SandboxUnavailable):
        raise
    except BaseException:
        return 0.0, "exception"


# ----------------------------------------------------------------------------------------------------------------
# accuracy (math), multiple choice, countdown, reasoning-gym


def _mv():
    import logging
    import math_verify
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it logs every timeout as a warning
    return math_verify


def _wrap(s):
    """math-verify finds LaTeX only inside $...$ or \\boxed{}: wrap bare answers ("\\frac{1}{2}", "x = 5")."""
    s = s.strip().rstrip(".")
    return s if re.search(r"(?<!\\)\$|\\boxed", s) else f"${s}$"


def _parse(text):  # sympy objects only: a raw-string fallback would make an unparseable gold look usable
    return _mv().parse(_wrap(text), fallback_mode="no_fallback", parsing_timeout=MV_TIMEOUT) if text.strip() else []


@lru_cache(maxsize=4096)
def _parse_gold(gold):
    return _parse(gold) or None


def _math(completion, gold, cheap_only=False, answer_block=False):
    """(1.0 | 0.0 | None, reason). cheap_only: return None when deciding needs sympy."""
    gold, ans = str(gold), extract_answer(completion, answer_block)
    bad = ("no_answer_tag" if ans is None else "empty_answer" if not ans
           else "answer_too_long" if len(ans) > MAX_ANSWER_CHARS else None)
    g, p = _number(gold), (None if bad else _number(ans))
    if g is not None and bad:
        return 0.0, bad  # a plain-number gold is always parseable
    if g is not None and p is not None and (g == p or g.denominator == 1 == p.denominator):
        return (1.0, None) if g == p else (0.0, "wrong_answer")  # exact, and what math-verify says too
    if cheap_only:
        return None
    if threading.current_thread() is not threading.main_thread():
        return _in_worker(_math, (completion, gold, False, answer_block))  # signal.alarm needs a main thread
    if _parse_gold(gold) is None:
        return None, "unparseable_gold"
    if bad:
        return 0.0, bad
    if _squash(ans) == _squash(gold):
        return 1.0, None
    pred = _parse(ans)
    if not pred:
        return 0.0, "unparseable_answer"
    ok = _mv().verify(_parse_gold(gold), pred, timeout_seconds=MV_TIMEOUT)  # gold first: not symmetric (P12)
    return (1.0, None) if ok else (0.0, "wrong_answer")


def _exact(completion, gold, answer_block=False):
    """Text equality of the extracted answer and the gold, for notations math-verify would misread (the toy's
    reversed digits: gold "09" is ninety, and "9" must not match it)."""
    ans = extract_answer(completion, answer_block)
    if ans is None:
        return 0.0, "no_answer_tag"
    return (1.0, None) if ans == str(gold).strip() else (0.0, "wrong_answer")


def same_answer(a, b):
    """Do two extracted answers say the same thing? Plain numbers by value ("1,000" and "1000.0"), then text with
    spaces removed, then math-verify both ways ("1/2", "0.5", "\\frac12"). For majority votes (cons@k); outside a
    main thread math-verify cannot time out, so only the cheap checks run there."""
    if a is None or b is None:
        return a is b
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    if _squash(a) == _squash(b):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        pa, pb = _parse(a), _parse(b)
        return bool(pa and pb and _mv().verify(pa, pb, timeout_seconds=MV_TIMEOUT)
                    and _mv().verify(pb, pa, timeout_seconds=MV_TIMEOUT))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # math-verify's timeout is a BaseException
        return False


def accuracy_reward(completion, answer):
    """1.0 if the last <answer> block (else the last \\boxed{}) equals the gold, 0.0 if not, None if the gold
    cannot be parsed. Plain numbers are compared exactly; everything else through math-verify, gold first."""
    return _safe(_math, completion, answer)[0]


_CHOICE = re.compile(r"\(?([A-Za-z])\)?(?:[.:)]\s*.*)?", re.S)


def _choice(completion, gold, answer_block=False):
    g = str(gold).strip().strip("()").upper()
    if not re.fullmatch(r"[A-Z]", g):
        return None, "unparseable_gold"
    ans = extract_answer(completion, answer_block)
    if ans is None:
        return 0.0, "no_answer_tag"
    m = _CHOICE.fullmatch(re.sub(r"\\text\{(.*?)\}", r"\1", ans).strip().strip("$").strip())
    if not m:
        return 0.0, "unparseable_answer"  # "A, B", "AB", "A cat" are not one choice
    return (1.0, None) if m.group(1).upper() == g else (0.0, "wrong_answer")


def choice_reward(completion, answer):
    """Multiple choice: the answer must be exactly one option letter ("C", "(C)", "C. text"), equal to the gold."""
    return _safe(_choice, completion, answer)[0]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _countdown(completion, numbers, target, answer_block=False):
    ans = extract_answer(completion, answer_block)
    if ans is None:
        return 0.0, "no_answer_tag"
    expr = ans.split("=")[0]  # "3*8 = 24" is fine; the value is checked anyway
    if not re.fullmatch(r"[\d\s+\-*/()]{1,200}", expr):
        return 0.0, "bad_expression"

    def ev(node):  # exact rational arithmetic on + - * / only: no **, //, names or calls
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("not allowed")

    used = []
    try:
        value = ev(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return 0.0, "bad_expression"
    if collections.Counter(used) - collections.Counter(int(n) for n in numbers):
        return 0.0, "numbers_misused"  # a number not given, or used more often than given
    return (1.0, None) if value == int(target) else (0.0, "wrong_answer")


def countdown_reward(completion, numbers, target):
    """1.0 if the answer is an arithmetic expression (+ - * / and parentheses) using each given number at most
    once and equal to target."""
    return _safe(_countdown, completion, numbers, target)[0]


@lru_cache(maxsize=None)
def _rg_scorer(name):
    import reasoning_gym
    return reasoning_gym.get_score_answer_fn(name)


def _rg(completion, name, entry, exact=False, answer_block=False):
    ans = extract_answer(completion, answer_block)
    if ans is None:
        return 0.0, "no_answer_tag"
    try:
        score = min(max(float(_rg_scorer(name)(ans, entry)), 0.0), 1.0)
    except ImportError:
        return None, "rg_missing"
    if exact and score < 1.0:
        score = 0.0  # the default scorer pays len(gold)/len(answer) to any answer containing the gold (P12)
    return (score, None) if score > 0 else (0.0, "wrong_answer")


def reasoning_gym_reward(completion, rg_name, rg_entry, exact=False):
    """reasoning-gym passthrough: the dataset's own score_answer on the extracted answer; exact=True pays only 1.0."""
    return _safe(_rg, completion, rg_name, rg_entry, exact)[0]


# ----------------------------------------------------------------------------------------------------------------
# format and language consistency


def format_reward(completion, think_prefilled=False):
    """1.0 for exactly one <think>...</think> then exactly one non-empty <answer>...</answer>, only whitespace
    between, before and after. think_prefilled: the prompt already ended with "<think>"."""
    try:
        text = "<think>" + completion if think_prefilled else completion
        if any(text.count(t) != 1 for t in ("<think>", "</think>", "<answer>", "</answer>")):
            return 0.0
        m = re.fullmatch(r"\s*<think>.*</think>\s*<answer>(.*)</answer>\s*", text, re.S)
        return 1.0 if m and m.group(1).strip() else 0.0
    except Exception:
        return 0.0


_SKIP = re.compile(r"```.*?```|`[^`]*`|\$\$.*?\$\$|(?<!\\)\$.*?(?<!\\)\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[A-Za-z]+", re.S)
_SCRIPTS = {  # a word is a run of letters of one script; Han and kana count one word per character
    "latin": r"[A-Za-z\u00C0-\u024F]+(?:'[A-Za-z]+)?", "han": r"[\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF]",
    "kana": r"[\u3040-\u30FF]", "hangul": r"[\uAC00-\uD7AF]+", "cyrillic": r"[\u0400-\u04FF]+",
    "arabic": r"[\u0600-\u06FF]+", "devanagari": r"[\u0900-\u097F]+"}
_WORD = re.compile("|".join(f"(?P<{k}>{v})" for k, v in _SCRIPTS.items()))
LANG_SCRIPTS = {"en": {"latin"}, "fr": {"latin"}, "de": {"latin"}, "es": {"latin"}, "zh": {"han"},
                "ja": {"kana", "han"}, "ko": {"hangul"}, "ru": {"cyrillic"}, "ar": {"arabic"}, "hi": {"devanagari"}}


def language_consistency_reward(text, lang="en"):
    """Share of words in the target language among the words of the reasoning (R1: Num(Words_target)/Num(Words)).
    text is the reasoning, or a completion whose <think> block is used. Code, LaTeX and numbers do not count;
    no words scores 0. Words are told apart by script, so "en" means Latin script."""
    if lang not in LANG_SCRIPTS:
        raise ValueError(f"language_consistency_reward: lang={lang!r} not in {sorted(LANG_SCRIPTS)}")
    try:
        if "<think>" in text:
            text = text.split("<think>", 1)[1].split("</think>", 1)[0]
        elif "</think>" in text:
            text = text.split("</think>", 1)[0]  # the prompt prefilled <think>
        scripts = [m.lastgroup for m in _WORD.finditer(_SKIP.sub(" ", text))]
        return sum(s in LANG_SCRIPTS[lang] for s in scripts) / len(scripts) if scripts else 0.0
    except Exception:
        return 0.0


# ----------------------------------------------------------------------------------------------------------------
# code: tests split on the trusted side; the code runs in a sandboxed process and the tests in its supervisor, which
# calls the code's functions over a pipe with plain data (sandbox_runner.py)

_FENCE = re.compile(r"```(?:python3?|py)?[ \t]*\n(.*?)```", re.S)
_SETUP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
          ast.AnnAssign, ast.AugAssign, ast.Pass)


def split_tests(tests, entry_point=None):
    """Test source -> [(statement source, counts as a test)]. Imports, definitions and assignments are setup;
    every other top-level statement is one test. HumanEval's `def check(candidate)` is inlined with
    `candidate = entry_point`, so each of its asserts counts (a pass fraction rather than all-or-nothing)."""
    if entry_point is not None and not str(entry_point).isidentifier():
        raise ValueError(f"entry_point {entry_point!r} is not a Python identifier")
    units, inlined = [], False
    for node in ast.parse(tests).body:
        body = [node]
        if entry_point and isinstance(node, ast.FunctionDef) and node.name == "check" and len(node.args.args) == 1:
            units.append((f"{node.args.args[0].arg} = {entry_point}", False))
            body, inlined = node.body, True
        elif inlined and isinstance(node, ast.Expr) and getattr(getattr(node.value, "func", None), "id", "") == "check":
            continue  # check(entry_point) after the inlined body
        units += [(ast.unparse(s), not isinstance(s, _SETUP) and not (
            isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))) for s in body]
    return units


def _code(completion, tests, timeout=4.0, binary=False, entry_point=None, memory_mb=1024, isolation="strict"):
    try:
        units = split_tests(tests, entry_point)
    except (SyntaxError, ValueError, TypeError):
        return None, "bad_tests"
    counted = [c for _, c in units]
    if not any(counted):
        return None, "bad_tests"
    blocks = _FENCE.findall(completion)
    if not blocks:
        return 0.0, "no_code"
    bits, reason, _ = run_sandboxed(blocks[-1], [u for u, _ in units], timeout, memory_mb, isolation)
    if bits is None or len(bits) != len(units):
        return 0.0, reason or "sandbox_error"
    frac = sum(b == "1" for b, c in zip(bits, counted) if c) / sum(counted)
    frac = float(frac == 1.0) if binary else frac
    return (frac, None) if frac > 0 else (0.0, reason or "tests_failed")


def code_reward(completion, tests, timeout=4.0, binary=False, entry_point=None, memory_mb=1024, isolation="strict"):
    """Run the completion's last ```python block in the sandbox and the tests against it from outside: the fraction
    of tests passed (binary: 1.0 only if all pass). None: bad tests. isolation="weak" accepts running without root
    or a user namespace (the code is then walled by Python-level guards only); "strict" raises SandboxUnavailable."""
    _check_isolation("code_reward: isolation", isolation)
    return _safe(_code, completion, tests, timeout, binary, entry_point, memory_mb, isolation)[0]


SANDBOX_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # all the sandbox sees: no trainer secrets
# The supervisor is imported, not run as a script: a script is compiled from source at every start (5 ms), a module
# comes from __pycache__. The repo leaves sys.path before the model's code could import the trainer's modules.
RUNNER = ("import sys; sys.path.insert(0, %r); import sandbox_runner; del sys.path[0]; sandbox_runner._supervise()"
          % os.path.dirname(os.path.abspath(__file__)))
PRETEND_ENV = "NANO_R1_SANDBOX_PRETEND"  # test-only: "no_root" | "no_isolation" (see sandbox_runner's docstring)


def _names(units):
    """The names the tests mention, so the model's process reports only those; builtins always mean the builtin
    (a model's own `len` must not stand in for the tests' `len`). A unit that does not parse fails in the judge."""
    names = set()
    for u in units:
        try:
            names.update(n.id for n in ast.walk(ast.parse(u)) if isinstance(n, ast.Name))
        except SyntaxError:
            pass
    return sorted(names - set(dir(builtins)))


def _message(obj):
    data = marshal.dumps(obj)
    return len(data).to_bytes(8, "little") + data


def _check_isolation(where, isolation):
    if isolation not in ("strict", "weak"):
        raise ValueError(f"{where}={isolation!r}; expected 'strict' or 'weak'")


def run_sandboxed(code, units, timeout=4.0, memory_mb=1024, isolation="strict"):
    """Run code in a fresh sandbox and each unit (test source) against it from the supervisor.
    -> (one "1"/"0" per unit or None, reason or None, the isolation achieved: "uid+ns" | "uid" | "userns" | "none").
    Raises SandboxUnavailable when only "none" is possible and isolation is not "weak"."""
    _check_isolation("run_sandboxed: isolation", isolation)
    units = list(units)
    cfg = {"code": code, "names": _names(units), "timeout": float(timeout), "memory_mb": int(memory_mb),
           "isolation": isolation, "pretend": os.environ.get(PRETEND_ENV) or None}
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-c", RUNNER], env=SANDBOX_ENV, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", start_new_session=True)
    except OSError:
        return None, "sandbox_error", None
    try:  # two messages: the supervisor reads the tests only after the model's process has split off
        out, err = proc.communicate(_message(cfg) + _message(units), timeout=timeout + 15)
        line, _, message = out.decode().partition("\n")
        bits, reason, achieved = line.split()
    except subprocess.TimeoutExpired:  # the supervisor hung: a test stuck in C code, out of its SIGALRM's reach
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None, "timeout", None
    except ValueError:  # a broken sandbox would silently zero every code reward: say so
        print(f"rewards: the sandbox supervisor failed:\n{err.decode(errors='replace')[-2000:]}", file=sys.stderr)
        return None, "sandbox_error", None
    if reason == "refused":
        raise SandboxUnavailable(message.strip())
    if reason == "sandbox_error":  # a wall did not go up (or the code faked that message: it scores 0 all the same)
        print(f"rewards: the sandbox could not be set up: {message.strip()}", file=sys.stderr)
    return (None if bits == "-" else bits), (None if reason == "-" else reason), achieved


# ----------------------------------------------------------------------------------------------------------------
# the batch entry point: one call per GRPO step


_POOLS, _POOL_LOCK = {}, threading.Lock()


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle


def _get_pool(workers):
    with _POOL_LOCK:
        if workers not in _POOLS:  # forkserver/spawn: never fork the trainer itself (threads, CUDA)
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            _POOLS[workers] = ctx.Pool(workers, initializer=_worker_init)
        return _POOLS[workers]


def _drop_pool(workers):
    with _POOL_LOCK:
        pool = _POOLS.pop(workers, None)
    if pool is not None:
        pool.terminate()


atexit.register(lambda: [p.terminate() for p in list(_POOLS.values())])


def _in_worker(fn, args, timeout=60):
    """Run fn in a worker process's main thread, where math-verify's signal-based timeouts work."""
    try:
        return _get_pool(1).apply_async(fn, args).get(timeout)
    except mp.TimeoutError:
        _drop_pool(1)
        return 0.0, "timeout"


def _job(kind, completion, answer, meta, opts):
    if kind == "math":
        return _safe(_math, completion, answer, False, opts["answer_block"])
    if kind == "code":
        return _safe(_code, completion, meta.get("tests", ""), opts["code_timeout"], opts["code_binary"],
                     meta.get("entry_point"), 1024, opts["code_isolation"])
    return _safe(_rg, completion, meta.get("rg_name"), meta.get("rg_entry"), opts["rg_exact"], opts["answer_block"])


def _jobs(chunk):
    return [_job(*j) for j in chunk]


def _run_heavy(jobs, workers):
    """Score jobs in a bounded pool; a job not back by a generous deadline scores 0 ("worker_timeout")."""
    if workers <= 0:
        return _jobs(jobs)
    math = [i for i, j in enumerate(jobs) if j[0] == "math"]
    chunks = [[i] for i, j in enumerate(jobs) if j[0] != "math"] + [math[k:k + 8] for k in range(0, len(math), 8)]
    budget = sum(j[4]["code_timeout"] + 5 if j[0] == "code" else 2 * MV_TIMEOUT + 1 for j in jobs)
    deadline, pool = time.monotonic() + 30 + budget / workers, _get_pool(workers)
    pending = [(c, pool.apply_async(_jobs, ([jobs[i] for i in c],))) for c in chunks]
    out, lost = [None] * len(jobs), False
    for c, res in pending:
        try:
            rs = res.get(max(0.0, deadline - time.monotonic()))
        except mp.TimeoutError:
            rs, lost = [(0.0, "worker_timeout")] * len(c), True
        for i, r in zip(c, rs):
            out[i] = r
    if lost:
        _drop_pool(workers)  # a hung or dead worker: start afresh next step
    return out


def score_batch(completions, examples, weights=None, workers=2, lang="en", think_prefilled=False,
                code_timeout=4.0, code_binary=False, rg_exact=False, answer_block=False, code_isolation="strict"):
    """Score one step's completions against their examples (duck-typed: .kind, .answer, .meta).
    -> (total per completion, {"accuracy"|"format"|"language": per-completion value or None}, Counter of reasons)
    Accuracy is the correctness of any kind (math, choice, countdown, code tests, reasoning-gym); None means
    skipped (unparseable gold, bad tests) and adds 0 to the total. Language is computed only when weighted
    (target: meta["lang"] else lang). Plain-number math, choice, countdown, format and language are scored here;
    math needing sympy, code and reasoning-gym run in `workers` processes (0: in this process). answer_block: the
    prompt's format asks for <answer></answer> (the R1-Zero and toy templates), so only that block is an answer;
    without it a \\boxed{} anywhere counts too (for models that answer in a box). code_isolation="weak" accepts
    running code without root or a user namespace; under "strict" (the default) that raises SandboxUnavailable
    (see code_reward)."""
    weights = WEIGHTS if weights is None else weights
    for k in weights:
        if k not in ("accuracy", "format", "language"):
            raise ValueError(f"score_batch: unknown weight {k!r}; expected accuracy, format or language")
    if len(completions) != len(examples):
        raise ValueError(f"score_batch: {len(completions)} completions but {len(examples)} examples")
    n = len(completions)
    acc, why = [None] * n, [None] * n
    fmt = [format_reward(c, think_prefilled) for c in completions]
    lng = [language_consistency_reward(c, (ex.meta or {}).get("lang", lang)) if weights.get("language") else None
           for c, ex in zip(completions, examples)]
    _check_isolation("score_batch: code_isolation", code_isolation)
    opts = {"code_timeout": code_timeout, "code_binary": code_binary, "rg_exact": rg_exact,
            "answer_block": answer_block, "code_isolation": code_isolation}
    heavy = []
    for i, (c, ex) in enumerate(zip(completions, examples)):
        meta = ex.meta or {}
        kind = "rg" if "rg_name" in meta else ex.kind  # any reasoning-gym task is scored by its own verifier
        if kind not in KINDS:
            raise ValueError(f"score_batch: example {i} has kind {kind!r}; expected one of {KINDS}")
        r = (_safe(_exact, c, ex.answer, answer_block) if meta.get("notation") == "reversed" else
             _safe(_choice, c, ex.answer, answer_block) if kind == "choice" else
             _safe(_countdown, c, meta.get("numbers", ()), meta.get("target"), answer_block) if kind == "countdown"
             else _safe(_math, c, ex.answer, True, answer_block) if kind == "math" else None)
        if r is None:
            keep = {k: meta[k] for k in ("tests", "entry_point", "rg_name", "rg_entry") if k in meta}
            heavy.append((i, (kind, c, ex.answer, keep, opts)))
        else:
            acc[i], why[i] = r
    for (i, _), r in zip(heavy, _run_heavy([j for _, j in heavy], workers)):
        acc[i], why[i] = r
    comps = {"accuracy": acc, "format": fmt, "language": lng}
    total = [sum(w * comps[k][i] for k, w in weights.items() if comps[k][i] is not None) for i in range(n)]
    reasons = collections.Counter(r for r, a in zip(why, acc) if r and not a)
    if 0.0 in fmt:
        reasons["bad_format"] = fmt.count(0.0)
    return total, comps, reasons
