"""Rewards per second for one GRPO step's worth of completions: 512 math (32 problems x 16 samples) and 64 code
(8 problems x 8 samples), scored by rewards.score_batch, against simple peers on the same completions.

    python bench/rewards.py [--workers=2] [--math=512] [--code=64]

Peers: math -- the same answer extraction, then math_verify.verify(parse(gold), parse(answer)) on every sample in
this process (TRL's and open-r1's accuracy rewards call math-verify per sample like this); code -- `python -c
code+tests` per sample through subprocess.run with the same number of threads as our workers (no sandbox, no
limits, exit code 0 = pass). The printed ratio is ours / peer.
The completions are synthetic but shaped like real ones: mostly plain-number golds (GSM8K-like), some LaTeX golds,
right and wrong answers, missing tags, boxes, thousands separators. Run it alone: 2 busy processes on 2 cores
distort every number.
"""
import argparse
import concurrent.futures
import dataclasses
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402


@dataclasses.dataclass
class Example:
    prompt: str
    answer: str
    kind: str = "math"
    meta: dict = dataclasses.field(default_factory=dict)


LATEX = [("\\frac{3}{4}", ["0.75", "\\dfrac{3}{4}", "\\frac{6}{8}", "\\frac{4}{3}"]),
         ("2\\sqrt{3}", ["\\sqrt{12}", "2\\sqrt{3}", "3\\sqrt{2}"]),
         ("\\frac{\\pi}{6}", ["\\pi/6", "30", "\\frac{\\pi}{3}"]),
         ("x = 7", ["7", "x=7", "x = -7"]),
         ("(1, 2)", ["(1,2)", "(2, 1)"]),
         ("\\{1, 3\\}", ["1, 3", "\\{3, 1\\}", "\\{1\\}"])]


def math_batch(n, rng):
    """n completions over n // 16 problems: 3/4 plain-number golds, 1/4 LaTeX golds."""
    completions, examples = [], []
    for p in range(n // 16):
        if p % 4 == 3:
            gold, preds = LATEX[p % len(LATEX)]
        else:
            v = rng.randint(1, 20000)
            gold, preds = str(v), [str(v), f"{v:,}", str(v + rng.randint(1, 9)), f"{v}.0", str(v - 1)]
        for _ in range(16):
            ans = rng.choice(preds)
            form = rng.random()
            think = "Let me compute step by step. " * rng.randint(5, 40)
            if form < 0.1:
                c = think + f"So the answer is {ans}."  # no tags
            elif form < 0.25:
                c = f"<think>{think}</think> <answer>The answer is \\boxed{{{ans}}}</answer>"
            else:
                c = f"<think>{think}</think> <answer>{ans}</answer>"
            completions.append(c)
            examples.append(Example("q", gold))
    return completions, examples


CODE = [("def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b",
         "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(10, 5) == 15"),
        ("def rev(s):\n    return s[::-1]", "def rev(s):\n    return s",
         "assert rev('abc') == 'cba'\nassert rev('') == ''\nassert rev('ab') == 'ba'"),
        ("def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
         "def fib(n):\n    return n", "assert fib(0) == 0\nassert fib(1) == 1\nassert fib(10) == 55"),
        ("def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
         "def is_prime(n):\n    return n % 2 == 1", "assert is_prime(2)\nassert not is_prime(9)\nassert is_prime(97)"),
        ("import collections\ndef mode(xs):\n    return collections.Counter(xs).most_common(1)[0][0]",
         "def mode(xs):\n    return xs[0]", "assert mode([1, 2, 2]) == 2\nassert mode([3]) == 3"),
        ("def flat(xs):\n    return [y for x in xs for y in x]", "def flat(xs):\n    return xs",
         "assert flat([[1], [2, 3]]) == [1, 2, 3]\nassert flat([]) == []"),
        ("def sq(n):\n    return [i * i for i in range(n)]", "def sq(n)\n    return n",
         "assert sq(3) == [0, 1, 4]\nassert sq(0) == []"),
        ("def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a", "def gcd(a, b):\n    return 1",
         "assert gcd(12, 18) == 6\nassert gcd(7, 3) == 1\nassert gcd(0, 5) == 5")]


def code_batch(n, rng):
    completions, examples = [], []
    for i in range(n):
        good, bad, tests = CODE[(i // 8) % len(CODE)]
        src = good if rng.random() < 0.6 else bad
        completions.append(f"<think>write it</think> <answer>\n```python\n{src}\n```\n</answer>")
        examples.append(Example("q", "", "code", {"tests": tests}))
    return completions, examples


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def peer_math(completions, examples):
    """math-verify on every sample: the same answer extraction, then verify(parse(gold), parse(answer))."""
    mv, out = rewards._mv(), []
    for c, ex in zip(completions, examples):
        ans = rewards.extract_answer(c)
        out.append(float(bool(ans) and mv.verify(mv.parse(rewards._wrap(ex.answer)), mv.parse(rewards._wrap(ans)))))
    return out


def peer_code(completions, examples, threads, timeout):
    def one(c, ex):
        src = rewards._FENCE.findall(c)[-1] + "\n" + ex.meta["tests"]
        try:
            return float(subprocess.run([sys.executable, "-c", src], capture_output=True, timeout=timeout).returncode
                         == 0)
        except subprocess.TimeoutExpired:
            return 0.0
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, completions, examples))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--math", type=int, default=512)
    ap.add_argument("--code", type=int, default=64)
    ap.add_argument("--code-timeout", type=float, default=4.0)
    args = ap.parse_args()
    # warm-up on another batch of the same shape (pool start, imports, math-verify's parse caches), timed on this one
    wc, we = math_batch(args.math, random.Random(1))
    rewards.score_batch(wc, we, workers=args.workers)
    rewards.score_batch(wc, we, workers=0)
    peer_math(wc, we)
    rng = random.Random(0)
    mc, me = math_batch(args.math, rng)
    cc, ce = code_batch(args.code, rng)
    rewards.score_batch(cc[:2 * args.workers], ce[:2 * args.workers], workers=args.workers)

    (_, comps, reasons), t_ours = timed(lambda: rewards.score_batch(mc, me, workers=args.workers))
    (_, comps0, _), t_ours0 = timed(lambda: rewards.score_batch(mc, me, workers=0))
    peer, t_peer = timed(lambda: peer_math(mc, me))
    ours = [a or 0.0 for a in comps["accuracy"]]
    agree = sum(a == b for a, b in zip(ours, peer))
    print(f"math, {len(mc)} completions ({sum(a == 1 for a in ours)} correct by ours, {agree} agree with the peer)")
    print(f"  ours, score_batch workers={args.workers}: {len(mc) / t_ours:9.1f} rewards/s  ({t_ours:.2f} s)")
    print(f"  ours, score_batch workers=0: {len(mc) / t_ours0:9.1f} rewards/s  ({t_ours0:.2f} s)")
    print(f"  peer, math_verify parse+verify per sample: {len(mc) / t_peer:9.1f} rewards/s  ({t_peer:.2f} s)")
    print(f"  ratio ours(workers={args.workers}) / peer: {t_peer / t_ours:.1f}x   reasons: {dict(reasons)}")

    (_, comps, reasons), t_code = timed(lambda: rewards.score_batch(cc, ce, workers=args.workers,
                                                                     code_timeout=args.code_timeout))
    peer, t_peer = timed(lambda: peer_code(cc, ce, args.workers, args.code_timeout))
    passed = sum(a == 1.0 for a in comps["accuracy"])
    print(f"code, {len(cc)} completions ({passed} pass all tests by ours, {int(sum(peer))} by the peer)")
    print(f"  ours, sandboxed, score_batch workers={args.workers}: {len(cc) / t_code:7.1f} rewards/s  ({t_code:.2f} s)")
    print(f"  peer, python -c per sample, {args.workers} threads, no sandbox: {len(cc) / t_peer:7.1f} rewards/s"
          f"  ({t_peer:.2f} s)")
    print(f"  ratio ours / peer: {t_peer / t_code:.2f}x")


if __name__ == "__main__":
    main()
