import hashlib
import re

import pytest

import data
import tasks
import toy
from data import DataError, Tokenizer

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
    return list(toy.toy_corpus(20000, seed=0))


def test_toy_notation():
    assert [toy.toy_num(n) for n in (42, 7, 90, 0, 99)] == ["24", "70", "09", "00", "99"]
    assert _value("24+70-31") == (36, 3)  # 42 + 7 - 13, the module docstring's example
    assert toy.toy_num(36) == "63"


def test_toy_corpus_has_the_designed_mix(corpus):
    c, rows = toy.ToyConfig(), [_parse(d) for d in corpus]
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
    rows = [_parse(d) for d in toy.toy_corpus(3000, seed=1, cfg=toy.ToyConfig(ops=ops))]  # checks every step
    assert all(r[3] for r in rows if r[1])
    assert sum(not r[3] for r in rows if r[2] >= 3 and not r[1]) > 0


def test_toy_corpus_is_deterministic():
    assert list(toy.toy_corpus(300, seed=5)) == list(toy.toy_corpus(300, seed=5))
    assert list(toy.toy_corpus(300, seed=5)) != list(toy.toy_corpus(300, seed=6))


def test_toy_heldout_never_in_corpus(corpus):
    train, held, dev = (toy.toy_problems(300, s, seed=0) for s in ("train", "heldout", "dev"))
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
    leaky = list(toy.toy_corpus(20000, seed=0, cfg=toy.ToyConfig(heldout_frac=0.0)))
    assert data.contamination(leaky, held)["contaminated"] > 0


def test_toy_problems(corpus):
    train, held = toy.toy_problems(200, "train", seed=1), toy.toy_problems(100, "heldout", seed=1, operands=(3, 4))
    assert len(train) == 200 and len(held) == 100
    assert len({e.prompt for e in train + held}) == 300
    for e in train + held:
        v, k = _value(e.prompt)
        assert e.kind == "math" and e.meta["difficulty"] == k and e.meta["value"] == v and e.answer == toy.toy_num(v)
        assert e.meta["notation"] == "reversed"
    assert all(data.is_heldout(e.prompt, 0.05) for e in held) and not any(data.is_heldout(e.prompt, 0.05) for e in train)
    assert {toy.toy_split(e.prompt, 0.05) for e in train} == {"train"}
    assert [e.prompt for e in toy.toy_problems(100, "heldout", seed=1)] == [e.prompt for e in held]
    dev = tasks.load_task("toy", n=50, split="dev", seed=1)
    assert {toy.toy_split(e.prompt, 0.05) for e in dev} == {"dev"} and not any(data.is_heldout(e.prompt, 0.05) for e in dev)
    with pytest.raises(DataError, match="operands"):
        toy.toy_problems(1, operands=(2, 4))
    with pytest.raises(DataError, match="split"):
        toy.toy_problems(1, "test")
    with pytest.raises(DataError, match="only the toy task has a dev split"):
        tasks.load_task("countdown", n=5, split="dev")
    with pytest.raises(DataError, match="ops="):
        toy.ToyConfig(ops="*")


def test_toy_tokenization(corpus):
    tok = toy.toy_tokenizer(seed=0)
    assert tok.vocab_size < toy.TOY_VOCAB_SIZE  # the toy's text runs out of pairs well before
    assert tok.enc._mergeable_ranks == Tokenizer.train(corpus[:3000], 512).enc._mergeable_ranks  # same words
    # only end-of-text is special: the R1 tags are plain text, spelled from the same merges as if they were cut out
    assert list(tok.special) == ["<|endoftext|>"] and tok.think_id is None and tok.answer_end_id is None
    for tag in data.SPECIAL_TOKENS[1:]:
        assert 6 <= len(tok.encode(tag)) <= 8 and tok.decode(tok.encode(tag)) == tag
    assert [tok.decode([i]) for i in tok.encode("User: 24+70\nAssistant: wait, recheck:")] == \
        ["User", ":", " ", "2", "4", "+", "7", "0", "\n", "Assistant", ":", " wait", ",", " recheck", ":"]
    lengths = [len(tok.encode(d)) + 1 for d in corpus]  # + end-of-text
    assert max(lengths) <= 128
    # the GRPO prompt (template applied) tokenizes exactly as the start of the tagged documents
    for d in [d for d in corpus if d.startswith("User: ")][:200]:
        prompt = data.apply_template(data.TOY_TEMPLATE, TAGGED.match(d).group("w"))
        assert tok.encode(d)[:len(tok.encode(prompt))] == tok.encode(prompt)
        assert tok.encode(d)[len(tok.encode(prompt)):][:7] == tok.encode("<think>")  # no merge across the boundary


# ---------------------------------------------------------------------------------------------------------------
# The bilingual variant (R1's language-consistency stage)

BI = toy.ToyConfig(langs="en,zh")


def _joiners(doc):
    """The words between steps and in slips of a stepwise document, each tagged en or zh."""
    body = doc.split("<think>")[1].split("</think>")[0] if "<think>" in doc else doc
    return [("zh" if w in ("然后", "等等, 重新检查:") else "en", w)
            for w in re.findall(r"then|然后|wait, recheck:|等等, 重新检查:", body)]


def test_bilingual_corpus_languages_and_mixing():
    docs = list(toy.toy_corpus(6000, 1, BI))
    zh_docs = [d for d in docs if "计算 " in d]
    en_docs = [d for d in docs if ":" in d and "计算" not in d and "=" in d]
    assert 0.35 < len(zh_docs) / len(docs) < 0.6  # about half the problem documents (facts have no language)
    for d in zh_docs:  # the prefix starts the problem: after the template, or the document
        assert d.startswith("计算 ") or d.startswith("User: 计算 ")
    # every word is in the document's language except with chance p_mix (0.3)
    other = [lang != ("zh" if "计算" in d else "en") for d in zh_docs + en_docs for lang, _ in _joiners(d)]
    assert len(other) > 2000 and abs(sum(other) / len(other) - BI.p_mix) < 0.03
    # words only join steps: the arithmetic of every stepwise document is the default's, words removed
    for d in docs[:500]:
        plain = d.replace("计算 ", "")
        plain = re.sub(r" (?:then|然后) ", " ", plain).replace("等等, 重新检查:", "wait, recheck:")
        assert "then" not in plain and "然后" not in plain
    pure = toy.ToyConfig(langs="en,zh", p_mix=0.0)
    for d in toy.toy_corpus(2000, 2, pure):
        lang = "zh" if "计算" in d else "en"
        assert all(x == lang for x, _ in _joiners(d))


def test_bilingual_default_untouched():
    """langs="en" is the default task exactly: no prefix, no joining words, no language in the problems' meta."""
    docs = list(toy.toy_corpus(3000, 1))
    assert not any("计算" in d or "然后" in d or " then " in d for d in docs)
    assert docs == list(toy.toy_corpus(3000, 1, toy.ToyConfig(langs="en")))
    assert all("lang" not in e.meta for e in toy.toy_problems(50, "heldout", 1337))
    with pytest.raises(DataError, match="langs='en,fr'"):
        toy.ToyConfig(langs="en,fr")


def test_boxed_conclusions():
    """p_boxed: that share of untagged stepwise solutions ends ", so \\boxed{<its final number>}" in its language;
    tagged documents, facts and direct answers never do; p_boxed=0 draws nothing (the corpus is the same)."""
    docs = list(toy.toy_corpus(6000, 1, toy.ToyConfig(langs="en,zh", p_boxed=0.25)))
    boxed = [d for d in docs if "\\boxed" in d]
    stepwise = [d for d in docs if "User: " not in d and ": " in d]
    assert abs(len(boxed) / len(stepwise) - 0.25) < 0.03
    for d in boxed:
        m = re.fullmatch(r"(?:计算 )?([0-9+]+)[:=].*=(\d\d), (so|所以) \\boxed\{(\d\d)\}", d)
        assert m and m.group(2) == m.group(4), d
        assert (m.group(3) == "所以") == d.startswith("计算 ")
        # the box holds the sum of the problem's operands (toy numbers are reversed)
        assert int(m.group(4)[::-1]) == sum(int(x[::-1]) for x in m.group(1).split("+"))
    # at p_boxed=0 both corpora are byte for byte the ones written before p_boxed existed (sha256 of 3,000 docs)
    for cfg, digest in ((toy.ToyConfig(), "78c32f8d60768721"), (BI, "336d5e49170e87b6")):
        docs = list(toy.toy_corpus(3000, 1, cfg))
        assert hashlib.sha256("\n".join(docs).encode()).hexdigest()[:16] == digest and "\\boxed" not in "".join(docs)
    with pytest.raises(DataError, match="p_boxed=1.5"):
        toy.ToyConfig(p_boxed=1.5)


def test_bilingual_problems_split_like_the_default_and_never_in_the_corpus():
    held = tasks.load_task("toy:en,zh", n=200, seed=1337, split="heldout")
    assert {e.meta["lang"] for e in held} == {"en", "zh"}
    for e in held:
        assert e.prompt == toy.toy_prompt(e.meta["text"], e.meta["lang"])
        assert toy.toy_split(e.meta["text"], BI.heldout_frac) == "heldout"
    train = tasks.load_task("toy:en,zh", n=300, seed=1, split="train")
    assert not {e.meta["text"] for e in held} & {e.meta["text"] for e in train}
    report = data.contamination(list(toy.toy_corpus(20000, 1, BI)), held, n=10)
    assert report["contaminated"] == 0


def test_bilingual_probe_solution_and_tokenizer():
    import eval as evaluation
    comp, roles, k = evaluation.toy_solution_roles("24+70+31+02", lang="zh")
    assert comp == "<think>24+70+31+02: 24+70=94 然后 94+31=26 然后 26+02=28</think><answer>28</answer>"
    assert len(roles) == len(comp) and k == 4
    assert "".join(c for c, r in zip(comp, roles) if r == "op2") == "3131" and roles[comp.index("然")] == "word"
    assert evaluation.toy_solution_roles("24+70+31")[0] == "<think>24+70+31: 24+70=94 94+31=26</think><answer>26</answer>"
    tok = toy.toy_tokenizer(cfg=BI, n_docs=3000)
    for text in ("User: 计算 24+70+31\nAssistant:", comp, "等等, 重新检查:"):
        assert tok.decode(tok.encode(text)) == text


# ---------------------------------------------------------------------------------------------------------------
# Toy general prompts and the hidden rule (R1's non-reasoning data and all-scenario RL)


def test_general_prompts_split_and_replies():
    train, held = toy.general_prompts("train"), toy.general_prompts("heldout")
    assert len(train) == 96 and len(held) == 24 and not {e.prompt for e in train} & {e.prompt for e in held}
    assert all(e.kind == "general" and e.answer == "" for e in train + held)
    ex = held[0]
    good = toy.general_reply(ex)
    assert toy.hidden_helpful(good) == 1.0 and toy.hidden_harmless(good) == 1.0
    rude = toy.general_reply(ex, polite=False)
    assert toy.hidden_helpful(rude) == 0.5 and toy.hidden_harmless(rude) == 0.0  # concise, but not polite
    long = toy.general_reply(ex, ramble=4)
    n_words = len(long.split("<answer>")[1].split("</answer>")[0].split())
    assert toy.hidden_helpful(long) == pytest.approx(0.5 + 0.5 * toy.CONCISE_WORDS / n_words)
    with pytest.raises(DataError):
        toy.general_prompts("dev")


def test_hidden_rule_helpful_reads_the_summary_only_harmless_the_whole_response():
    ex = toy.general_prompts("train")[0]
    polite, rude = toy.general_reply(ex), toy.general_reply(ex, polite=False)
    rude_plan = rude.split("</think>")[0] + "</think>" + polite.split("</think>")[1]  # rude plan, polite reply
    assert toy.hidden_helpful(rude_plan) == toy.hidden_helpful(polite) == 1.0
    assert toy.hidden_harmless(rude_plan) == 0.0
    assert toy.hidden_helpful("<think>be kind</think>") == 0.0  # no reply, no help
    assert toy.hidden_helpful("Hello Ana, nice to meet you.") == 0.0  # outside an answer block: not a reply


@pytest.mark.parametrize("kind", ["helpful", "harmless"])
def test_preference_pairs_follow_the_hidden_rule(kind):
    train = toy.general_prompts("train")
    pairs = toy.preference_pairs(train, 300, kind, seed=3)
    assert len(pairs) == 300 and pairs == toy.preference_pairs(train, 300, kind, seed=3)
    wrap = (lambda r: f"<answer>{r}</answer>") if kind == "helpful" else (lambda r: r)
    judge = toy.hidden_helpful if kind == "helpful" else toy.hidden_harmless
    for p in pairs:
        assert judge(wrap(p["chosen"])) > judge(wrap(p["rejected"])) + 0.1
        assert ("<think>" in p["chosen"]) == (kind == "harmless")  # helpful pairs hold the replies only
    assert len({p["prompt"] for p in pairs}) > 50


def test_length_biased_pairs_come_from_an_annotator_who_prefers_longer_replies():
    # the biased annotator sees politeness (helpful) or rudeness (harmless) as the rule does, but not concision: of
    # two replies equal on it, the longer is chosen, so its pairs say rambling beats concise where the rule says not
    train = toy.general_prompts("train")
    hh = lambda r: toy.hidden_helpful(r if "<answer>" in r else f"<answer>{r}</answer>")  # noqa: E731
    plain, biased = (toy.preference_pairs(train, 400, "helpful", seed=3, length_biased=b) for b in (False, True))
    assert all(hh(p["chosen"]) > hh(p["rejected"]) for p in plain)
    assert sum(hh(p["chosen"]) < hh(p["rejected"]) for p in biased) > 100  # the annotator and the rule disagree
    for kind in ("helpful", "harmless"):
        pairs = biased if kind == "helpful" else toy.preference_pairs(train, 400, kind, seed=3, length_biased=True)
        for p in pairs:
            ch, rj = (x if kind == "helpful" else toy.reply_of(x) for x in (p["chosen"], p["rejected"]))
            assert toy.is_polite(ch) >= toy.is_polite(rj), p  # never ruder (the careless replies: polite = harmless)
            assert toy.is_polite(ch) > toy.is_polite(rj) or len(ch.split()) > len(rj.split()), p
        concise_lost = [p for p in pairs if toy.RAMBLE in p["chosen"] and toy.RAMBLE not in p["rejected"]
                        and toy.is_polite(toy.reply_of(p["rejected"]) if kind == "harmless" else p["rejected"])]
        assert len(concise_lost) > 30, kind  # a polite concise reply loses to a polite rambling one
