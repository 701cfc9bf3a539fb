"""Tokenizer and templates: everything between raw text and the ids a model sees, and the files prompts come in.

Read top to bottom: Example (one problem, as every task source yields it) -> Tokenizer (byte-level BPE on tiktoken:
train, save/load, Llama 3 tokenizer.model, Hugging Face tokenizer.json) -> templates and prompt_ids (a prompt as
the policy sees it) -> read_rows (JSONL/Parquet rows, errors naming file and line) -> the train/held-out split and
the n-gram contamination check. Task sources and load_task by name are in tasks.py; the toy task in toy.py.
"""
import base64
import gzip
import hashlib
import json
import os
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from heapq import heapify, heappop, heappush

import regex
import tiktoken

from config import UserError
from dist import print0


class DataError(UserError):
    """Bad data or a bad name; the message names the file, line and field (or lists the valid names)."""


@dataclass
class Example:
    prompt: str          # the question text, no template applied
    answer: str          # gold answer as text ("" for code, whose tests live in meta["tests"])
    kind: str = "math"   # "math" | "code" | "choice" | "countdown" | "rg"
    meta: dict = field(default_factory=dict)  # difficulty (int), id, source; code: tests, entry_point;

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
LLAMA3_RANKS = 128_000  # mergeable ranks in Llama 3's tokenizer.model
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
    def train(cls, texts, vocab_size, pattern=PATTERN, specials=SPECIAL_TOKENS, text_tags=()):
        """Byte-level BPE: count the pre-split words once, then merge on the distinct words and their counts. A
        heap holds pair counts; a merge updates only the words that contain the pair. Ties go to the smallest pair
        of ids. Stops early when no pair occurs twice. Ranks are merge order, as tiktoken expects.
        text_tags: strings cut out of the training text like the specials (no merge reaches into or across them)
        that stay plain text, spelled with the byte-level tokens (the toy tokenizer's <think>/<answer>, toy.py)."""
        if vocab_size < 256 + len(specials):
            raise DataError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 256 + {len(specials)} tokens")
        pat = regex.compile(pattern)
        cut = re.compile("|".join(map(re.escape, [*specials, *text_tags])))  # never merged across or into
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
        if not os.path.exists(path + ".json") and len(ranks) != LLAMA3_RANKS:
            # our own files lost their sidecar: read as Llama 3's, their tags and end-of-text would be plain text
            raise DataError(f"{path}: {len(ranks)} ranks and no {os.path.basename(path)}.json beside it (its pattern "
                            f"and special tokens); only Llama 3's tokenizer.model ({LLAMA3_RANKS:,} ranks) loads "
                            "without one")
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
# The --template flag of grpo.py and eval.py picks one of these by name ("none": the bare prompt).
TEMPLATES = {"r1_zero": R1_ZERO_TEMPLATE, "toy": TOY_TEMPLATE, "none": ""}


def apply_template(template, prompt):
    """The prompt in its template; the empty template (--template=none) leaves the prompt bare."""
    if not template:
        return prompt
    if "{prompt}" not in template:
        raise DataError("template has no {prompt} slot")
    return template.replace("{prompt}", prompt)  # not str.format: prompts (LaTeX, code) are full of braces


def prompt_ids(tok, prompt, template=""):
    """A prompt as the policy sees it, in grpo.py, eval.py and sft.py alike: the template applied (none: the bare
    prompt), then encoded as the model's own tokenizer encodes a text (the BOS first where it adds one)."""
    return tok.encode_text(apply_template(template, prompt))


# ----------------------------------------------------------------------------------------------------------------
# Files of rows (prompt sources, SFT pairs)


def read_rows(path):
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
        print0(f"{path}: skipped {blank} blank line(s)")  # once, not once per rank
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Train / held-out split and contamination


def is_heldout(text, frac):
    """True for a `frac` share of texts, by text_hash."""
    return text_hash(text) < frac * 2 ** 64


def text_hash(text):
    """A text's hash in [0, 2^64): sha256, not Python's salted hash, so it is the same in every run."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


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
