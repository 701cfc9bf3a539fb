import json
import os
import random
import re
from collections import Counter

import pytest
import regex
from hypothesis import given, settings, strategies as st

import data
import toy
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
    return Tokenizer.train(_corpus() + list(toy.toy_corpus(500, seed=3)), vocab_size=600)


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


def test_text_tags_stay_plain_text_and_unmerged():
    texts = ["<think>ab ab</think><answer>cd</answer>"] * 50
    t = Tokenizer.train(texts, 400, specials=["<|endoftext|>"], text_tags=data.SPECIAL_TOKENS[1:])
    assert t.special == {"<|endoftext|>": t.vocab_size - 1} and t.think_id is None
    assert t.enc._mergeable_ranks == Tokenizer.train(texts, 400).enc._mergeable_ranks  # merged as if special
    for tag in data.SPECIAL_TOKENS[1:]:
        assert t.encode(tag) == list(tag.encode())  # byte by byte: no merge reaches into a tag
        assert t.decode(t.encode(f"x{tag}y")) == f"x{tag}y"
    # without text_tags the tags' letters merge (the check above can fail)
    merged = Tokenizer.train(texts, 400, specials=["<|endoftext|>"])
    assert len(merged.encode("<think>")) < len("<think>")


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
    # the ranks file without its sidecar is not silently read as Llama 3's (tags and end-of-text as plain text)
    os.remove(path + ".json")
    with pytest.raises(DataError, match="tok.tiktoken.json"):
        Tokenizer.from_file(path)


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
    assert toy.toy_tokenizer(n_docs=200).encode_text("12+34") == toy.toy_tokenizer(n_docs=200).encode("12+34")


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
    assert data.apply_template(data.TEMPLATES["none"], q) == q  # --template=none: the bare prompt

# ---------------------------------------------------------------------------------------------------------------
# Contamination


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
