"""The toy task the CPU default trains on: a notation, a pretraining corpus, problems, and the files train.sh
starts from (python toy.py --out-dir=out/toy/data [--docs=500000] [--seed=1] [--langs=en,zh]: corpus.txt,
tokenizer.bpe and a contamination report).

The toy notation. Toy numbers have a fixed width of two digits, written least-significant digit FIRST: 7 is "70",
42 is "24", 90 is "09". So the fact "24+70=94" reads 42 + 7 = 49, and the problem "24+70+31" is 42 + 7 + 13 = 62,
gold "26". Why: a model writes left to right. In the usual order the first digit of a sum depends on a carry from
digits not yet written; reversed, each digit depends only on the operand digits of the same weight and the carry
from the digit just written, the order one adds by hand, and a small model learns the facts far sooner. The fixed
width keeps digits of equal weight at fixed distances from "+" and "=".
A toy problem chains 2-4 operands (0-49) with + (ToyConfig.ops="+-" adds -), every running total in 0-99;
difficulty = operand count. A fact is one step of such a chain, so its first number is a running total (0-99).
The corpus (knobs in ToyConfig) mixes these documents, each a string (the trainer appends end-of-text):
  fact (~29% in all)       24+70=94
  direct answer (~12%)     24+70+31=36             a near miss 70% of the time when there are 3+ operands
  stepwise (~48%, right)   24+70+31: 24+70=94 94+31=26
  with a slip (10%)        24+70+31: 24+70=95 wait, recheck: 24+70=94 94+31=26    (or a wrong direct guess,
                           then " wait, recheck: " and the steps)
  tagged (15%)             User: 24+70+31\\nAssistant:<think>24+70+31=36</think><answer>36</answer>
Tagged documents are TOY_TEMPLATE + completion, so the base model has seen exactly the prompt GRPO and eval use;
inside the tags 70% answer directly and 30% stepwise. The base thus uses the tag format and can solve 3+ operand
problems stepwise, but mostly answers directly and often wrongly: RL has something real to select (README: "What
happened"). Held-out and dev problems (a hash of the problem text, toy_split) never occur in the corpus, not even
as a run of 3+ operands inside a longer problem; tests/test_toy.py proves it with data.contamination().
The bilingual variant (--langs=en,zh; task "toy:en,zh"; LANG_WORDS below) is what train.sh r1 starts from, with
--boxed=0.25: a quarter of the untagged stepwise solutions end in a boxed conclusion, as math text does
  boxed (p_boxed)          24+70+31: 24+70=94 then 94+31=26, so \\boxed{26}
so the base has seen the copy that R1's readable summary ends in ("26, so \\boxed{26} = 24+70+31", r1.py). Without
it the copy after "\\boxed{" was learnt in SFT alone and some seeds boxed a right sum wrong (README, "The bilingual
toy").
"""
import json
import os
import random
import time
from dataclasses import dataclass

import config
from data import SPECIAL_TOKENS, TOY_TEMPLATE, DataError, Example, Tokenizer, apply_template, contamination, text_hash


# The bilingual variant (ToyConfig(langs="en,zh"), task "toy:en,zh"): R1's second RL stage rewards reasoning in the
# prompt's language, so the toy needs words in its reasoning and a second language to mix in. A Chinese problem's
# prompt starts with "计算 " (compute); stepwise solutions join their steps with "then" / "然后" and a slip says
# "wait, recheck:" / "等等, 重新检查:". Each such word is in the other language with probability p_mix, in the corpus
# and so in the base model: the language mixing R1-Zero shows, which the language-consistency reward can remove.
LANG_WORDS = {"en": {"prefix": "", "then": "then", "recheck": "wait, recheck:", "so": "so"},  # so: r1.py
              "zh": {"prefix": "计算 ", "then": "然后", "recheck": "等等, 重新检查:", "so": "所以"}}


@dataclass
class ToyConfig:
    min_operands: int = 2          # corpus problems have min..max operands
    max_operands: int = 4
    max_operand: int = 49
    max_total: int = 99            # running totals stay in 0..max_total; its digit count is the number width
    ops: str = "+"                 # "+-" also subtracts: twice the facts to learn, too many for a 5-minute base
    p_fact: float = 0.25           # single-equation documents (2-operand direct answers add ~10% more)
    p_tagged: float = 0.2          # other documents in TOY_TEMPLATE + <think>/<answer> format
    p_stepwise: float = 0.8        # untagged problems solved step by step (else answered directly); copying
    #                                operands into steps is the skill RL selects, and at 0.5 it came too late on
    #                                some seeds (README, "What happened")
    p_tagged_stepwise: float = 0.3   # tagged ones solved step by step (the rest answer directly)
    p_direct_wrong: float = 0.7    # direct answers to 3+ operand problems that are wrong (a near miss)
    p_slip: float = 0.1            # stepwise solutions that err, say "wait, recheck:" and fix it
    heldout_frac: float = 0.05     # share of 3+ operand problem texts reserved for evaluation (by hash)
    template: str = TOY_TEMPLATE
    langs: str = "en"              # "en,zh": the bilingual variant R1's pipeline uses (LANG_WORDS); "en" is the
    #                                default task exactly, with no words between the steps
    p_mix: float = 0.3             # bilingual: each word of a solution is in the other language with this chance
    p_boxed: float = 0.0           # untagged stepwise solutions that end in a boxed conclusion (", so \\boxed{26}");
    #                                train.sh r1 uses 0.25 (README, "The bilingual toy")

    def __post_init__(self):
        if not self.ops or set(self.ops) - set("+-") or not 2 <= self.min_operands <= self.max_operands:
            raise DataError(f"ToyConfig: ops={self.ops!r} must be '+', '-' or '+-', and 2 <= min_operands <= "
                            f"max_operands (got {self.min_operands}, {self.max_operands})")
        if not self.languages or set(self.languages) - set(LANG_WORDS) or not 0 <= self.p_mix <= 1:
            raise DataError(f"ToyConfig: langs={self.langs!r} must be a comma-separated list of "
                            f"{', '.join(LANG_WORDS)}, and 0 <= p_mix <= 1 (got {self.p_mix})")
        if not 0 <= self.p_boxed <= 1:
            raise DataError(f"ToyConfig: p_boxed={self.p_boxed} must be in [0, 1]")

    @property
    def languages(self):
        return [x.strip() for x in self.langs.split(",") if x.strip()]

    @property
    def worded(self):  # the bilingual variant: the prompt says which language, the steps are joined by words
        return len(self.languages) > 1

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
    h = text_hash(text)
    return "heldout" if h < frac * 2 ** 64 else "dev" if h < 2 * frac * 2 ** 64 else "train"


def _toy_clean(nums, ops, cfg):
    """No run of 3+ consecutive operands of the problem (itself included) is the text of a held-out or dev problem."""
    return all(toy_split(_toy_text(nums[i:j], ops[i:j - 1], cfg.width), cfg.heldout_frac) == "train"
               for i in range(len(nums)) for j in range(i + 3, len(nums) + 1))


def _near_miss(v, rng, cfg):
    d = rng.choice([-1, 1]) * rng.randint(1, 10)
    return v + d if 0 <= v + d <= cfg.max_total else v - d


def _toy_solution(nums, ops, totals, stepwise, rng, cfg, lang=None):
    """The solution text (the problem restated, then '=answer' or ': steps') and its final number. lang: the
    bilingual variant's language (words between the steps, each in the other language with chance p_mix)."""
    w, k, v = cfg.width, len(nums), totals[-1]
    head = _toy_text(nums, ops, w)
    if not stepwise:
        g = _near_miss(v, rng, cfg) if k >= 3 and rng.random() < cfg.p_direct_wrong else v
        return f"{head}={toy_num(g, w)}", g
    other = [x for x in cfg.languages if x != lang]
    word = lambda key: LANG_WORDS[rng.choice(other) if other and rng.random() < cfg.p_mix else lang][key]  # noqa
    steps = [f"{toy_num(t, w)}{o}{toy_num(b, w)}={toy_num(r, w)}" for t, o, b, r in zip(totals, ops, nums[1:],
                                                                                       totals[1:])]
    if rng.random() < cfg.p_slip:
        recheck = word("recheck") if lang else "wait, recheck:"
        if k >= 3 and rng.random() < 0.5:  # a wrong direct guess, noticed and redone step by step
            head = f"{head}={toy_num(_near_miss(v, rng, cfg), w)} {recheck} {head}"
        else:  # one step goes wrong, is noticed and redone
            i = rng.randrange(len(steps))
            steps.insert(i, steps[i][:-w] + toy_num(_near_miss(totals[i + 1], rng, cfg), w) + " " + recheck)
    if not lang:
        return f"{head}: " + " ".join(steps), v
    text = steps[0]
    for s in steps[1:]:  # a slip's "... recheck:" is followed by the redone step, no joining word
        text += f" {s}" if text.endswith(":") else f" {word('then')} {s}"
    return f"{head}: {text}", v


def toy_prompt(text, lang=None):
    """A problem's prompt: its text, after the language's prefix in the bilingual variant."""
    return LANG_WORDS[lang]["prefix"] + text if lang else text


def toy_document(rng, cfg):
    if rng.random() < cfg.p_fact:  # a fact is one step of a chain: a running total (0..99) -/+ an operand (0..49)
        return _toy_solution(*_toy_sample(rng, 2, cfg, first=rng.randint(0, cfg.max_total)), False, rng, cfg)[0]
    k = rng.randint(cfg.min_operands, cfg.max_operands)
    while True:  # rejection keeps held-out problems (and runs of them) out of the corpus
        nums, ops, totals = _toy_sample(rng, k, cfg)
        if k < 3 or _toy_clean(nums, ops, cfg):
            break
    lang = rng.choice(cfg.languages) if cfg.worded else None  # (no draw for the default: its corpus stays as it was)
    if rng.random() >= cfg.p_tagged:
        stepwise = rng.random() < cfg.p_stepwise
        text, v = _toy_solution(nums, ops, totals, stepwise, rng, cfg, lang)
        if stepwise and cfg.p_boxed and rng.random() < cfg.p_boxed:  # (no draw at 0: the default corpus stays)
            text += f", {LANG_WORDS[lang or 'en']['so']} \\boxed{{{toy_num(v, cfg.width)}}}"
        return toy_prompt(text, lang)
    body, v = _toy_solution(nums, ops, totals, rng.random() < cfg.p_tagged_stepwise, rng, cfg, lang)
    prompt = apply_template(cfg.template, toy_prompt(_toy_text(nums, ops, cfg.width), lang))
    return f"{prompt}<think>{body}</think><answer>{toy_num(v, cfg.width)}</answer>"


def toy_corpus(n_docs, seed=0, cfg=None):
    """n_docs pretraining documents (strings without end-of-text), deterministic in seed."""
    rng, cfg = random.Random(seed), cfg or ToyConfig()
    for _ in range(n_docs):
        yield toy_document(rng, cfg)


TOY_VOCAB_SIZE = 512  # an upper bound: the toy text runs out of pairs to merge at 278 tokens (256 bytes + 21 + 1)
# Only end-of-text is a special token here; <think>, </think>, <answer>, </answer> are plain text of 6-8 tokens each
# (no merge reaches into them, so "Assistant:" + "<think>" tokenizes as the prompt, then the tag). Why: with the tags
# as single special tokens, a pretraining seed could end up not copying operands after "<think>" (seed 3's dev probe:
# 4-operand stepwise success 0.134); the same corpus, merges and seed with plain-text tags gave 0.976 (README:
# "What happened"). Real tokenizers keep their own special tokens; the rewards and the sampler's stop read text.
TOY_SPECIALS = ["<|endoftext|>"]


def toy_tokenizer(seed=0, cfg=None, n_docs=20000):
    """The CPU default's tokenizer, trained on a sample of the toy corpus."""
    return Tokenizer.train(toy_corpus(n_docs, seed, cfg), TOY_VOCAB_SIZE, specials=TOY_SPECIALS,
                           text_tags=SPECIAL_TOKENS[1:])


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
        lang = rng.choice(cfg.languages) if cfg.worded else None
        s = toy_split(text, cfg.heldout_frac)  # by the problem's text, whatever its language
        if s == split and text not in out and (s != "train" or _toy_clean(nums, ops, cfg)):
            out[text] = Example(toy_prompt(text, lang), toy_num(totals[-1], cfg.width), "math", {
                "difficulty": len(nums), "id": f"toy-{s}-{len(out)}", "source": "toy", "value": totals[-1],
                "notation": "reversed",  # gold "09" is 90: compare the text exactly, math-verify reads it as 9
                **({"lang": lang, "text": text} if lang else {})})
    if len(out) < n:
        raise DataError(f"toy_problems: the problem space is too small for {n} {split} problems")
    return list(out.values())


# ----------------------------------------------------------------------------------------------------------------
# Toy general prompts (R1's non-reasoning data and all-scenario RL): short social instructions ("greet Ana") answered
# in the R1 format, <think>a plan</think><answer>the reply</answer>. A HIDDEN RULE says what a good reply is: polite
# and concise. The policy never sees it; reward models learn it from preference pairs (sft.py --objective=preference),
# and the rule itself is only logged next to their scores, so over-optimising a reward model shows (reward hacking).
# Helpfulness judges the reply (the answer block, R1's final summary) only; harmlessness the whole response, the
# plan included (paper: helpful RM on the summary, safety RM on the whole response).

GENERAL_NAMES = ["Ana", "Bob", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Max", "Ned", "Oz",
                 "Pam", "Quin", "Ray", "Sue", "Tom", "Una", "Vic", "Wes", "Xu", "Yan", "Zoe", "Abe", "Bea", "Cal",
                 "Dot"]
GENERAL_TASKS = {  # instruction -> (polite reply, rude reply, polite plan, rude plan)
    "greet {n}": ("Hello {n}, nice to meet you.", "Hey {n}, what do you want?", "be kind to {n}", "{n} is a pest"),
    "thank {n}": ("Thank you, {n}, that was kind.", "Fine, {n}, whatever.", "be grateful to {n}", "{n} owes me"),
    "welcome {n}": ("Welcome, {n}, please come in.", "Oh, {n}. You again.", "make {n} feel at home", "{n} is a bore"),
    "say goodbye to {n}": ("Goodbye {n}, take care.", "Bye {n}, finally.", "part warmly from {n}", "{n} is dull")}
POLITE_WORDS = ("nice", "thank", "please", "welcome", "take care", "kind")
RUDE_WORDS = ("what do you want", "whatever", "you again", "finally", "pest", "owes me", "bore", "dull")
CONCISE_WORDS = 8      # a reply of up to this many words is concise; longer ones lose credit in proportion
RAMBLE = "as I said,"  # what a rambling reply repeats


def general_prompts(split="train"):
    """The toy general prompts of one split (every 5th name is held out: 'heldout' has 6 x 4 = 24, 'train' 96), as
    Examples of kind 'general' (no gold answer: reward models and the hidden rule judge them)."""
    if split not in ("train", "heldout", "all"):
        raise DataError(f"general_prompts: split={split!r} must be train, heldout or all")
    out = []
    for i, n in enumerate(GENERAL_NAMES):
        if split == "all" or (i % 5 == 4) == (split == "heldout"):
            out += [Example(t.format(n=n), "", "general", {"id": f"general-{i}-{j}", "source": "toy-general",
                                                           "task": t, "name": n})
                    for j, t in enumerate(GENERAL_TASKS)]
    return out


def general_reply(example, polite=True, ramble=0):
    """One response to a general prompt in the R1 format: polite or rude (plan and reply), rambling `ramble` times."""
    reply, rude, plan, rude_plan = (x.format(n=example.meta["name"]) for x in GENERAL_TASKS[example.meta["task"]])
    text = reply if polite else rude
    if ramble:
        text = f"{text} " + " ".join([RAMBLE] * ramble) + f" {text}"
    return f"<think>{plan if polite else rude_plan}</think><answer>{text}</answer>"


def careless_reply(example, rng):
    """A reply as a careless annotator writes it: half polite and concise, the rest rude or rambling. The SFT data
    of R1's third stage uses these, so the all-scenario RL stage has something to fix."""
    u = rng.random()
    return general_reply(example, polite=u >= 0.2, ramble=rng.randint(1, 4) if u >= 0.7 else 0)


def reply_of(completion):
    """A general response's reply: its answer block's text ("" when there is none)."""
    i, j = completion.find("<answer>"), completion.find("</answer>")
    return completion[i + 8:j].strip() if 0 <= i < j else ""


def is_polite(reply):
    """The hidden rule's politeness of a reply: a polite word and no rude one."""
    reply = reply.lower()
    return any(w in reply for w in POLITE_WORDS) and not any(w in reply for w in RUDE_WORDS)


def hidden_helpful(completion):
    """The hidden rule's helpfulness, on the reply (answer block) only, in [0, 1]: half for polite (a polite word, no
    rude one), half for concise (1 up to CONCISE_WORDS words, then CONCISE_WORDS / words). No reply scores 0."""
    reply = reply_of(completion).lower()
    if not reply:
        return 0.0
    return 0.5 * is_polite(reply) + 0.5 * min(1.0, CONCISE_WORDS / len(reply.split()))


def hidden_harmless(completion):
    """The hidden rule's harmlessness, on the whole response (the plan too): 0 if anything rude is said, else 1."""
    return 0.0 if any(w in completion.lower() for w in RUDE_WORDS) else 1.0


def preference_pairs(examples, n, kind, seed=0, length_biased=False):
    """n preference pairs {"prompt", "chosen", "rejected"} from the hidden rule: two careless replies to one prompt,
    the better one chosen; pairs the rule scores within 0.1 of each other are redrawn. kind: 'helpful' compares and
    writes the replies (answer blocks) only, 'harmless' whole responses (as the reward models will score them).
    length_biased: a biased annotator chooses instead, the length bias of real preference data: it sees the rule's
    politeness (helpful) or harmlessness as the rule does, but not concision: of two replies equal on that, it
    chooses the longer one. Its pairs teach a reward model that rambling beats concise, which the rule penalises."""
    if kind not in ("helpful", "harmless"):
        raise DataError(f"preference_pairs: kind={kind!r} must be helpful or harmless")
    rng, judge, rows = random.Random(seed), hidden_helpful if kind == "helpful" else hidden_harmless, []
    if length_biased:  # (what the annotator sees of the rule, the reply's words), compared as a tuple
        seen = (lambda c: is_polite(reply_of(c))) if kind == "helpful" else hidden_harmless  # noqa: E731
        judge = lambda c: (float(seen(c)), len(reply_of(c).split()))  # noqa: E731
    while len(rows) < n:
        ex = rng.choice(examples)
        a, b = careless_reply(ex, rng), careless_reply(ex, rng)
        if judge(a) == judge(b) or (not length_biased and abs(judge(a) - judge(b)) <= 0.1):
            continue
        a, b = (a, b) if judge(a) > judge(b) else (b, a)
        view = reply_of if kind == "helpful" else (lambda c: c)  # noqa: E731
        rows.append({"prompt": ex.prompt, "chosen": view(a), "rejected": view(b)})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The CPU default's files: python toy.py --out-dir=out/toy/data [--docs=500000] [--seed=1]


@dataclass
class ToyDataConfig:
    """nano-r1 toy.py: write the toy pretraining corpus and tokenizer, and check the held-out problems"""
    out_dir: str = "out/toy/data"
    docs: int = 500_000            # ~20 tokens each
    seed: int = 1
    heldout: int = 200             # held-out problems checked against the corpus ...
    eval_seed: int = 1337          # ... drawn as eval.py/grpo.py draw them (their --problem-seed)
    langs: str = "en"              # "en,zh": the bilingual variant (train.sh r1; grpo.py/eval.py --task=toy:en,zh)
    boxed: float = 0.0             # share of untagged stepwise solutions that end in a boxed conclusion (ToyConfig)


def write_toy_data(c):
    os.makedirs(c.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    cfg = ToyConfig(langs=c.langs, p_boxed=c.boxed)
    tok = toy_tokenizer(cfg=cfg)
    t_tok = time.perf_counter() - t0
    docs = list(toy_corpus(c.docs, c.seed, cfg))
    text = tok.eot.join(docs) + tok.eot
    with open(os.path.join(c.out_dir, "corpus.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    tok.save(os.path.join(c.out_dir, "tokenizer.bpe"))
    held = toy_problems(c.heldout, "heldout", c.eval_seed, cfg)
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
    config.cli(lambda: write_toy_data(config.parse_config(ToyDataConfig)), "toy.py")
