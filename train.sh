#!/usr/bin/env bash
# nano-r1: the R1-Zero pipeline as a readable script.
#
# Default (no GPU needed): a complete toy R1-Zero reproduction on CPU in about eleven minutes.
#   1. toy corpus + tokenizer       (toy.py)      reversed-digit addition, direct and stepwise solutions, some tagged
#   2. pretrain the toy MoE base    (sft.py)      a DeepSeek-V3-style MoE (MLA, 8 routed + 1 shared experts)
#   3. check the base (eval.py --probe) on dev problems: can it write the steps RL will select? if not, train it on
#      (up to BASE_CAP steps), then stop if it still cannot
#   4. evaluate the base            (eval.py)     held-out problems, R1-Zero-style template, k=4 at T=0.6, top-p 0.95
#   5. GRPO from the base           (grpo.py)     --preset=cpu: accuracy + format rewards, no length/reflection terms
#   6. evaluate the policy, print the before/after table, plot curves.png
# Every stage is skipped when its output exists; an interrupted training stage resumes from its last checkpoint.
# SEED=2 bash train.sh: another pretraining/RL/sampling seed (the corpus and the problems stay the same).
# bash train.sh seeds 5: the default run for SEED=1..5 one after another (out/seeds/<seed>), then one table.
# bash train.sh r1: DeepSeek-R1's pipeline on a bilingual toy (out/r1): the steps above, then cold start, reasoning RL
#   with the language reward, rejection sampling + general SFT, reward models, all-scenario RL; one table of stages.
#   LANG_ABLATION=1 bash train.sh r1 adds the language reward's ablation after the reasoning RL (step 8b);
#   BIASED_RM=1 the all-scenario RL again with reward models from a length-biased annotator (reward hacking, 11b).
# bash train.sh distill: r1, then distillation into a small dense student against RL of the same student.
# bash train.sh ablate: GRPO's knobs one at a time from the default run's base, 3 seeds each (ablate.py).
# OUT=out/toy2 bash train.sh writes elsewhere; DOCS, BASE_STEPS, RL_STEPS, EVAL_PROBLEMS shrink it (the test suite
# runs a tiny version this way); PROBE_MIN=0 skips the pre-RL check's verdict, BASE_MORE and BASE_CAP set how far a
# base that fails it trains on.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = seeds ]; then
    n=${2:-5}; dirs=""
    for s in $(seq 1 "$n"); do
        SEED=$s OUT=${OUT:-out/seeds}/$s bash train.sh || echo "seed $s: train.sh failed (exit $?)"
        dirs="$dirs${dirs:+,}${OUT:-out/seeds}/$s"
    done
    python eval.py --sweep="$dirs"
    exit 0
fi
if [ "${1:-}" = ablate ]; then
    # one knob at a time (ablate.py's SETTINGS) from the default run's base, SEEDS each, ABL_STEPS of GRPO, then
    # held-out pass@1 (k=2); one table and one plot of the curves (out/ablate/table.md, curves.png)
    BASE=${BASE:-out/toy/base}; A=${OUT:-out/ablate}; SEEDS=${SEEDS:-1 2 3}; ABL_STEPS=${ABL_STEPS:-40}
    ABL_PROBLEMS=${ABL_PROBLEMS:-200}; THREADS=${THREADS:-2}
    resume() { ls "$1"/ckpt_*.pt >/dev/null 2>&1 && echo --resume || true; }
    if [ ! -f "$BASE/final/config.json" ]; then
        echo "train.sh ablate: no base model in $BASE: run bash train.sh first, or set BASE=" >&2; exit 2
    fi
    start=$(date +%s)
    while read -r name flags; do
        [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $name "* ]] || continue  # ONLY="default gspo": those settings
        for s in $SEEDS; do
            d=$A/$name/$s
            [ -f "$d/rl/final/config.json" ] || python grpo.py --preset=cpu --init-from="$BASE" --out-dir="$d/rl" \
                --max-steps="$ABL_STEPS" --eval-every=0 --threads="$THREADS" --seed="$s" $flags $(resume "$d/rl") \
                < /dev/null
            [ -f "$d/eval/summary.json" ] || python eval.py --model="$d/rl" --task=toy --split=heldout \
                --problems="$ABL_PROBLEMS" --k=2 --template=toy --max-new-tokens=72 --workers=0 --threads="$THREADS" \
                --seed="$s" --out-dir="$d/eval" < /dev/null
        done
    done < <(python ablate.py --list --steps="$ABL_STEPS")
    python ablate.py --table --out-dir="$A" | tee "$A/table.md"
    echo "ablation wall time: $(( $(date +%s) - start ))s"
    exit 0
fi
MODE=${1:-zero}
case "$MODE" in
    zero) LANGS=en; TASK=toy; MAX_NEW=72; OUT=${OUT:-out/toy}; RL_STEPS=${RL_STEPS:-75}; SKIP=; BOXED=0 ;;
    # r1: the same first stages on the bilingual toy (toy.py --langs=en,zh: prompts in English or Chinese, words
    # between the steps, mixed in the corpus), longer outputs (the words, then the cold-start summary)
    # distill: the r1 pipeline (its finished stages are skipped), then distillation into a small dense student
    # R1-Zero for 50 steps, not 75: the bilingual policy peaks earlier (dev-split pass@1, seeds 1 / 2 / 3: after
    # 50 steps 0.993 / 1.000 / 0.946, after 75 0.978 / 0.953 / 0.877)
    # --skip-zero-adv in every RL run: no forward/backward for outputs whose gradient is exactly 0 (loss.live_rows;
    # 35% of R1-Zero's groups, 70-95% of the later stages'). The default run above keeps every row, so that its README
    # table reproduces bit for bit (the skip changes the order of float sums, not their value)
    r1|distill) LANGS=en,zh; TASK=toy:en,zh; MAX_NEW=${MAX_NEW:-112}; OUT=${OUT:-out/r1}; RL_STEPS=${RL_STEPS:-50}
        SKIP=--skip-zero-adv; BOXED=${BOXED:-0.25} ;;
    *) echo "train.sh: unknown mode '$1' (bash train.sh [seeds N | r1 | distill | ablate])" >&2; exit 2 ;;
esac
SEED=${SEED:-1}
THREADS=${THREADS:-2}
DOCS=${DOCS:-500000}; BASE_STEPS=${BASE_STEPS:-1000}; EVAL_PROBLEMS=${EVAL_PROBLEMS:-200}
# BASE_CAP=3000: the bilingual base of seed 3 on one machine failed the probe at 2,000 steps (4-operand success
# 0.165, rising from 0.000) and passed at 2,500 (0.853)
PROBE_MIN=${PROBE_MIN:-0.8}; BASE_MORE=${BASE_MORE:-500}; BASE_CAP=${BASE_CAP:-3000}
resume() { ls "$1"/ckpt_*.pt >/dev/null 2>&1 && echo --resume || true; }
mkdir -p "$OUT"
# stage NAME CMD...: run CMD and append its wall time to $OUT/times.tsv (what the seed sweep's table reports)
stage() { local t=$(date +%s); "${@:2}"; echo -e "$1\t$(( $(date +%s) - t ))" >> "$OUT/times.tsv"; }
start=$(date +%s)

# 1. corpus and tokenizer
[ -f "$OUT/data/tokenizer.bpe" ] || stage data python toy.py --out-dir="$OUT/data" --docs="$DOCS" --seed=1 \
    --langs="$LANGS" --boxed="$BOXED"

# 2. pretraining (the "base model"): 7-9 minutes on 2 cores. RL can only select what the base can do, and here that
#    is copying each operand into the steps. 8 attention heads, a corpus that copies often and the R1 tags as plain
#    text (toy.py) bring that skill by ~1,000 steps on most seeds (README: "What happened"); step 3 checks it.
pretrain() {  # pretrain STAGE_NAME MAX_STEPS: train (or resume) the base up to MAX_STEPS steps
    stage "$1" python sft.py --data="$OUT/data/corpus.txt" --tokenizer="$OUT/data/tokenizer.bpe" --out-dir="$OUT/base" \
        --num-attention-heads=8 --max-steps="$2" --batch-size=32 --seq-len=128 --lr=2e-3 --warmup-steps=100 \
        --log-every=100 --eval-every=250 --ckpt-every=250 --threads="$THREADS" --seed="$SEED" $(resume "$OUT/base"); }
[ -f "$OUT/base/final/config.json" ] || pretrain pretrain "$BASE_STEPS"

# 3. the pre-RL check, on dev problems (never in the corpus, never the held-out ones): RL here selects stepwise
#    solutions, so it can only reach what the base writes right once it works stepwise. PROBE_MIN=0.8: the bases
#    that ended below ~0.85 on some operand count after RL were far below this (README: "What happened"). A base
#    below it trains on, BASE_MORE steps at a time (resumed: the learning-rate schedule stretches to the new end),
#    up to BASE_CAP steps in all; a base still below it then stops the run before RL.
#    Once RL has run from the base, the check is skipped. check_base DIR TRAIN STAGE checks the base in DIR and trains
#    it on with `TRAIN STAGE STEPS` (distill's student base passes the same check).
check_base() {
    local steps=$BASE_STEPS
    until python eval.py --probe --model="$1" --task="$TASK" --split=dev --problems=200 --template=toy \
            --threads="$THREADS" --out-dir="$(dirname "$1")/probe_$(basename "$1")" --probe-min="$PROBE_MIN"; do
        steps=$((steps + BASE_MORE))
        if [ "$steps" -gt "$BASE_CAP" ]; then
            echo "train.sh: stopped before RL: trained to BASE_CAP=$BASE_CAP steps, the base in $1 still does not"
            echo "  write the stepwise solutions RL would select (numbers above). Try another SEED, raise BASE_CAP, or"
            echo "  run RL anyway with PROBE_MIN=0."
            exit 3
        fi
        echo "train.sh: the base does not yet write the stepwise solutions RL would select (numbers above): training it"
        echo "  on to $steps steps (BASE_MORE=$BASE_MORE, BASE_CAP=$BASE_CAP)"
        "$2" "$3" "$steps"
    done
}
[ -f "$OUT/rl/final/config.json" ] || check_base "$OUT/base" pretrain pretrain_more

# 4. the base on held-out problems (never in the corpus; toy.py checked)
EVAL="--task=$TASK --split=heldout --problems=$EVAL_PROBLEMS --k=4 --template=toy --max-new-tokens=$MAX_NEW"
EVAL="$EVAL --workers=0 --threads=$THREADS --seed=$SEED"
[ -f "$OUT/eval_base/summary.json" ] || stage eval_base python eval.py --model="$OUT/base" $EVAL \
    --out-dir="$OUT/eval_base"

# 5. R1-Zero: GRPO from the base with rule rewards only
[ -f "$OUT/rl/final/config.json" ] || stage grpo python grpo.py --preset=cpu --init-from="$OUT/base" \
    --out-dir="$OUT/rl" --task="$TASK" --max-new-tokens="$MAX_NEW" --max-steps="$RL_STEPS" \
    --eval-prompts="$EVAL_PROBLEMS" --seed="$SEED" $SKIP $(resume "$OUT/rl")

# 6. the policy on the same problems; before/after table, paired bootstrap, curves
[ -f "$OUT/eval_rl/summary.json" ] || stage eval_rl python eval.py --model="$OUT/rl" $EVAL --out-dir="$OUT/eval_rl"
if [ "$MODE" = zero ]; then
    python eval.py --report="$OUT/eval_base,$OUT/eval_rl" --curves="$OUT/rl/metrics.jsonl" \
        --curves-png="$OUT/curves.png"
    python eval.py --compare="$OUT/eval_base,$OUT/eval_rl"
    echo "total wall time: $(( $(date +%s) - start ))s"
    exit 0
fi

# ------------------------------------------------------------------------------------------------------------------
# bash train.sh r1: DeepSeek-R1's four stages after R1-Zero (paper Fig. 2), at toy scale. rl/ is R1-Zero.
R1_PROMPTS=${R1_PROMPTS:-400}; SFT_STEPS=${SFT_STEPS:-300}; RL2_STEPS=${RL2_STEPS:-50}
# RM_STEPS=40: both reward models rank every training pair right by step ~20 (Bradley-Terry loss < 0.01 by ~30)
RM_STEPS=${RM_STEPS:-40}
# DEV1_BATCH=16: Dev1's rows per step, half of $SFT's 32 and half its time; dev-split pass@1 of Dev1, seeds 1 / 2 /
# 3: 0.993 / 0.994 / 0.970 against 0.996 / 0.985 / 0.966 (chosen at 600 steps, before the corpus's boxed
# conclusions; at 300 steps with them, 0.999 / 0.995 / 0.990). Dev3 keeps 32: at 16, seed 2's fell to 0.825 (from
# 0.991)
DEV1_BATCH=${DEV1_BATCH:-16}
# Dev1 and Dev3 at SFT_STEPS=300: the corpus's boxed conclusions (toy.py --boxed) taught the base the copy the
# summaries end in. Without them both SFTs needed 600 steps, and still some seeds' Dev3 boxed right sums wrong
# (dev-split pass@1 of Dev3, seeds 1 / 2 / 3: 600 steps without them 0.984 / 0.955 / 0.979, 300 steps with them
# 0.999 / 1.000 / 1.000; README, "Three seeds, the current recipe")
RS_SFT_STEPS=${RS_SFT_STEPS:-$SFT_STEPS}
DEV1_STEPS=${DEV1_STEPS:-$SFT_STEPS}
# R1_RL_LR: the lr of the RL stages after the cold start (Dev2 and R1), below the preset's 1e-4 (steps 8 and 11)
R1_RL_LR=${R1_RL_LR:-3e-5}
RL4_STEPS=${RL4_STEPS:-60}; GENERAL_FROM=${GENERAL_FROM:-30}
# SFT at the pretraining's peak lr: the summary after </think> is new text; at 3e-4 for 120 steps Dev1 wrote
# garbage summaries (held-out pass@1 0.003). At 1e-3 for 300 steps: 0.99 on seed 1 but 0.29 on seed 3, whose summaries
# boxed wrong sums, until the summary began with the answer (r1.py rewrite; dev split, seeds 2 / 3: 0.99 / 0.99)
SFT="--tokenizer=$OUT/data/tokenizer.bpe --batch-size=32 --seq-len=160 --lr=1e-3 --warmup-steps=20 --log-every=50"
SFT="$SFT --eval-every=100 --ckpt-every=100 --threads=$THREADS --seed=$SEED"
TRAIN="--task=$TASK --split=train --problems=$R1_PROMPTS --template=toy --max-new-tokens=$MAX_NEW --workers=0"
TRAIN="$TRAIN --threads=$THREADS --seed=$SEED"

# 7. cold start (Dev1): R1-Zero's samples on training prompts at T=1 -> the correct, single-language, non-repetitive
#    ones, rewritten as reasoning + a summary for the reader (r1.py) -> SFT of the base on them
[ -f "$OUT/zero_samples/summary.json" ] || stage zero_samples python eval.py --model="$OUT/rl" $TRAIN --k=4 \
    --temperature=1.0 --top-p=1.0 --out-dir="$OUT/zero_samples"
[ -f "$OUT/cold_start.jsonl" ] || python r1.py --step=cold_start --samples="$OUT/zero_samples" \
    --out="$OUT/cold_start.jsonl" --max-tokens="$MAX_NEW"
[ -f "$OUT/dev1/final/config.json" ] || stage cold_start python sft.py --data="$OUT/cold_start.jsonl" \
    --init-from="$OUT/base" --out-dir="$OUT/dev1" --max-steps="$DEV1_STEPS" $SFT --batch-size="$DEV1_BATCH" \
    $(resume "$OUT/dev1")
[ -f "$OUT/eval_dev1/summary.json" ] || stage eval_dev1 python eval.py --model="$OUT/dev1" $EVAL \
    --out-dir="$OUT/eval_dev1"

# 8. reasoning RL with the language-consistency reward (Dev2): accuracy + format + the share of the reasoning's
#    words in the prompt's language. At lr 3e-5, not the preset's 1e-4: at 1e-4 seed 2 fell from Dev1's 0.986 to
#    0.950 on the dev split, at 3e-5 it kept 0.985 (worst of seeds 1-3: 0.964 against 0.950)
[ -f "$OUT/dev2/final/config.json" ] || stage grpo_lang python grpo.py --preset=cpu --init-from="$OUT/dev1" \
    --out-dir="$OUT/dev2" --task="$TASK" --max-new-tokens="$MAX_NEW" --language-weight=1 --max-steps="$RL2_STEPS" \
    --lr="$R1_RL_LR" --eval-prompts="$EVAL_PROBLEMS" --seed="$SEED" $SKIP $(resume "$OUT/dev2")
[ -f "$OUT/eval_dev2/summary.json" ] || stage eval_dev2 python eval.py --model="$OUT/dev2" $EVAL \
    --out-dir="$OUT/eval_dev2"
# 8b. LANG_ABLATION=1: the paper's ablation of the language reward. The same RL without it from Dev1 (does mixing
#     come back?) at Dev2's lr and steps, and with and without it from R1-Zero (what the reward buys where mixing
#     is, and what it costs in accuracy) at R1-Zero's own lr, the preset's 1e-4, for ZERO_LANG_STEPS=150 steps: in
#     50, seeds 1 and 2 moved from R1-Zero's consistency 0.535 / 0.492 only to 0.660 / 0.510 (README, "The language
#     reward's ablation")
ZERO_LANG_STEPS=${ZERO_LANG_STEPS:-150}
if [ "${LANG_ABLATION:-0}" = 1 ]; then
    for run in "dev2_nolang dev1 0 $R1_RL_LR $RL2_STEPS" "zero_lang rl 1 1e-4 $ZERO_LANG_STEPS" \
               "zero_nolang rl 0 1e-4 $ZERO_LANG_STEPS"; do  # name, start, language weight, lr, steps
        read -r name from lw lr steps <<< "$run"
        [ -f "$OUT/$name/final/config.json" ] || stage "grpo_$name" python grpo.py --preset=cpu \
            --init-from="$OUT/$from" --out-dir="$OUT/$name" --task="$TASK" --max-new-tokens="$MAX_NEW" \
            --language-weight="$lw" --max-steps="$steps" --lr="$lr" --eval-prompts="$EVAL_PROBLEMS" \
            --seed="$SEED" $SKIP $(resume "$OUT/$name")
        [ -f "$OUT/eval_$name/summary.json" ] || stage "eval_$name" python eval.py --model="$OUT/$name" $EVAL \
            --out-dir="$OUT/eval_$name"
    done
    runs="rl zero_nolang zero_lang dev1 dev2_nolang dev2"
    python eval.py --report="$(for s in $runs; do printf '%s' "$OUT/eval_$s,"; done | sed 's/,$//')"
fi

# 9. rejection sampling (Dev3): 8 samples per training prompt from Dev2, the correct, well-formed, single-language
#    ones kept, mixed with general prompts' SFT rows (r1.py), and the BASE fine-tuned on the mix, as the paper did
[ -f "$OUT/rs/sft.jsonl" ] || stage rejection_sampling python eval.py --model="$OUT/dev2" $TRAIN --k=8 \
    --rejection-sampling --max-per-prompt=2 --out-dir="$OUT/rs"
[ -f "$OUT/general/sft.jsonl" ] || python r1.py --step=general --out="$OUT/general" --seed="$SEED"
[ -f "$OUT/mix.jsonl" ] || python r1.py --step=mix --samples="$OUT/rs/sft.jsonl" --general="$OUT/general/sft.jsonl" \
    --out="$OUT/mix.jsonl" --seed="$SEED"
[ -f "$OUT/dev3/final/config.json" ] || stage rs_sft python sft.py --data="$OUT/mix.jsonl" --init-from="$OUT/base" \
    --out-dir="$OUT/dev3" --max-steps="$RS_SFT_STEPS" $SFT $(resume "$OUT/dev3")
[ -f "$OUT/eval_dev3/summary.json" ] || stage eval_dev3 python eval.py --model="$OUT/dev3" $EVAL \
    --out-dir="$OUT/eval_dev3"

# 10. reward models (the paper's helpful and harmless ones): Dev3 trained with the Bradley-Terry objective on pairs
#     the hidden rule chose (toy.py): helpful pairs hold the replies only, harmless pairs the whole responses
# 11. all-scenario RL (R1): reasoning prompts keep the rule rewards (and the language reward); from step
#     GENERAL_FROM on, a quarter of each rollout's prompts are general ones, rewarded by the two reward models (the
#     paper used preference rewards only in the last 400 of 1,700 steps). The hidden rule is logged beside them.
# 11b. BIASED_RM=1: both steps again (suffix _biased) with reward models that learn half of the hidden rule wrong:
#      their pairs come from an annotator who judges politeness as the rule does but, of two equally polite replies,
#      prefers the longer one (r1.py --length-biased), the length bias of real preference data. The policy can then
#      please the reward models by rambling, which the rule penalises (reward hacking)
# 11. at lr 3e-5, not the preset's 1e-4 (as Dev2): dev-split pass@1 of R1, seeds 1 / 2 / 3, at 1e-4 1.000 / 0.983 /
#     0.970, at 3e-5 0.996 / 0.990 / 0.998 (Dev3: 0.995 / 0.991 / 0.968). The rollouts' hidden helpfulness rises
#     more slowly (last 10 steps 0.87-0.91 against 0.94-0.95).
RM_SETS=(""); [ "${BIASED_RM:-0}" = 1 ] && RM_SETS+=(_biased)
for v in "${RM_SETS[@]}"; do
    [ -f "$OUT/general$v/sft.jsonl" ] || python r1.py --step=general ${v:+--length-biased} --out="$OUT/general$v" \
        --seed="$SEED"
    for kind in helpful harmless; do
        [ -f "$OUT/rm_$kind$v/final/config.json" ] || stage "rm_$kind$v" python sft.py --objective=preference \
            --data="$OUT/general$v/pairs_$kind.jsonl" --init-from="$OUT/dev3" --out-dir="$OUT/rm_$kind$v" \
            --max-steps="$RM_STEPS" $SFT --lr=3e-4 $(resume "$OUT/rm_$kind$v")
    done
    [ -f "$OUT/r1$v/final/config.json" ] || stage "grpo_all$v" python grpo.py --preset=cpu --init-from="$OUT/dev3" \
        --out-dir="$OUT/r1$v" --task="$TASK" --max-new-tokens="$MAX_NEW" --language-weight=1 --max-steps="$RL4_STEPS" \
        --general-frac=0.25 --general-from-step="$GENERAL_FROM" --rm-helpful="$OUT/rm_helpful$v" \
        --rm-harmless="$OUT/rm_harmless$v" --lr="$R1_RL_LR" --eval-prompts="$EVAL_PROBLEMS" --seed="$SEED" \
        $SKIP $(resume "$OUT/r1$v")
    [ -f "$OUT/eval_r1$v/summary.json" ] || stage "eval_r1$v" python eval.py --model="$OUT/r1$v" $EVAL \
        --out-dir="$OUT/eval_r1$v"
done

# every stage side by side, the general prompts judged by the hidden rule (r1.py --step=judge); the reward models'
# scores against the hidden rule over the last stage (reward hacking shows as the first rising, the second falling)
stages="base rl dev1 dev2 dev3$(printf ' r1%s' "${RM_SETS[@]}")"
for s in $stages; do
    [ -f "$OUT/eval_$s/general.json" ] || python r1.py --step=judge --model="$OUT/$s" --out="$OUT/eval_$s" \
        --max-new-tokens="$MAX_NEW" --threads="$THREADS" --seed="$SEED"
done
python eval.py --report="$(for s in $stages; do printf '%s' "$OUT/eval_$s,"; done | sed 's/,$//')"
for v in "${RM_SETS[@]}"; do
    python r1.py --step=hacking --metrics="$OUT/r1$v/metrics.jsonl" --out="$OUT/reward_hacking$v.png"
done
echo "total wall time: $(( $(date +%s) - start ))s"
if [ "$MODE" = r1 ]; then exit 0; fi

# ------------------------------------------------------------------------------------------------------------------
# bash train.sh distill: the paper's distillation-vs-RL question at toy scale. A smaller dense student (no routed
# experts, ~1M parameters against the teacher's 2M) is pretrained on the same corpus; then, from that base, (a) SFT
# on R1's correct samples on training prompts (distillation), and (b) R1-Zero RL on its own, given about the same
# wall time as (a) and R1's sampling (STUDENT_RL_STEPS). Both are evaluated like every stage above.
D=$OUT/distill; STUDENT_RL_STEPS=${STUDENT_RL_STEPS:-40}
# (an empty teacher/sft.jsonl, R1 having kept nothing, is sampled again on the next run: R1 may have been retrained)
[ -s "$D/teacher/sft.jsonl" ] || stage teacher_samples python eval.py --model="$OUT/r1" $TRAIN --k=4 \
    --rejection-sampling --max-per-prompt=2 --out-dir="$D/teacher"
student_pretrain() {  # as pretrain(), the student's shape
    stage "$1" python sft.py --data="$OUT/data/corpus.txt" --tokenizer="$OUT/data/tokenizer.bpe" \
        --out-dir="$D/student_base" --num-attention-heads=8 --n-routed-experts=0 --max-steps="$2" --batch-size=32 \
        --seq-len=128 --lr=2e-3 --warmup-steps=100 --log-every=100 --eval-every=250 --ckpt-every=250 \
        --threads="$THREADS" --seed="$SEED" $(resume "$D/student_base"); }
[ -f "$D/student_base/final/config.json" ] || student_pretrain student_pretrain "$BASE_STEPS"
# the teacher's base had to pass the pre-RL check, and so does the student's, before either arm starts from it: a
# student that cannot yet copy the operands gives RL nothing to select (seed 3 on machine C: stepwise success 0.071
# at 1,000 steps, its RL arm 0.081 -> 0.030 held-out, the distilled one 0.984)
[ -f "$D/distilled/final/config.json" ] || [ -f "$D/rl/final/config.json" ] || \
    check_base "$D/student_base" student_pretrain student_pretrain_more
[ -f "$D/distilled/final/config.json" ] || stage student_distill python sft.py --data="$D/teacher/sft.jsonl" \
    --init-from="$D/student_base" --out-dir="$D/distilled" --max-steps="$SFT_STEPS" $SFT $(resume "$D/distilled")
[ -f "$D/rl/final/config.json" ] || stage student_rl python grpo.py --preset=cpu --init-from="$D/student_base" \
    --out-dir="$D/rl" --task="$TASK" --max-new-tokens="$MAX_NEW" --max-steps="$STUDENT_RL_STEPS" \
    --eval-prompts="$EVAL_PROBLEMS" --seed="$SEED" $SKIP $(resume "$D/rl")
for s in student_base distilled rl; do
    [ -f "$D/eval_$s/summary.json" ] || stage "eval_student_$s" python eval.py --model="$D/$s" $EVAL \
        --out-dir="$D/eval_$s"
done
python eval.py --report="$OUT/eval_r1,$D/eval_student_base,$D/eval_distilled,$D/eval_rl"
python eval.py --compare="$D/eval_rl,$D/eval_distilled"
echo "wall time (s): distillation = R1's samples $(grep -P '^teacher_samples\t' "$OUT/times.tsv" | cut -f2 | tail -1)" \
    "+ SFT $(grep -P '^student_distill\t' "$OUT/times.tsv" | cut -f2 | tail -1); student RL" \
    "$(grep -P '^student_rl\t' "$OUT/times.tsv" | cut -f2 | tail -1)"
echo "total wall time: $(( $(date +%s) - start ))s"

# ------------------------------------------------------------------------------------------------------------------
# The real run (GPUs): R1-Zero on a Hugging Face MoE base with math prompts, the paper's settings (grpo.py defaults:
# G=16, 512 prompts x 16 per rollout in 16 mini-batches, mu=1, beta=0.001, lr 3e-6, T=1.0, ref refresh 400).
# BASE=/path/to/DeepSeek-V3-Base-bf16   (or a Qwen3-MoE directory; FP8 checkpoints must be converted to bf16 first)
# Each rank reads only its FSDP shard of $BASE; the final policy is exported tensor by tensor to out/r1zero/final.
# --batch-prompts bounds the sampler's KV cache (batch_prompts x 16 rows x (prompt + max_new_tokens) tokens per rank).
# torchrun --standalone --nproc_per_node=8 grpo.py --preset=paper --init-from=$BASE --tokenizer=$BASE/tokenizer.json \
#     --task=data/math_train.jsonl --template=r1_zero --max-new-tokens=32768 --batch-prompts=4 --out-dir=out/r1zero \
#     --wandb-project=nano-r1
# torchrun --standalone --nproc_per_node=8 eval.py --model=out/r1zero --tokenizer=$BASE/tokenizer.json \
#     --task=data/aime24.jsonl --split=all --k=64 --template=r1_zero --out-dir=out/r1zero_aime
# DeepSeek-R1's stages on GPUs (the paper's settings where it gives them; SFT: 2-3 epochs, cosine lr 5e-5 -> 5e-6,
# batch 128; the toy's r1.py steps need the bilingual toy: real data needs a model to filter, rewrite and judge).
# T=TOK=$BASE/tokenizer.json; G="torchrun --standalone --nproc_per_node=8"
# 1. cold start: R1-Zero's samples at T=1 on training prompts, the correct and readable ones, rewritten; SFT the base
# $G eval.py --model=out/r1zero --tokenizer=$TOK --task=data/math_train.jsonl --split=train --k=4 --temperature=1.0 \
#     --top-p=1.0 --template=r1_zero --rejection-sampling --out-dir=out/zero_samples   (then filter/rewrite them)
# $G sft.py --init-from=$BASE --tokenizer=$TOK --data=cold_start.jsonl --lr=5e-5 --min-lr-frac=0.1 \
#     --batch-size=16 --grad-accum=1 --max-steps=<3 epochs> --seq-len=32768 --dtype=bfloat16 --out-dir=out/dev1
# 2. reasoning RL with the language reward (accuracy + format + language consistency)
# $G grpo.py --preset=paper --init-from=out/dev1 --tokenizer=$TOK --task=data/math_train.jsonl --language-weight=1 \
#     --lang=en --out-dir=out/dev2
# 3. rejection sampling from Dev2, mixed with non-reasoning SFT data, SFT of the BASE (2 epochs)
# $G eval.py --model=out/dev2 --tokenizer=$TOK --task=data/math_train.jsonl --split=train --k=16 --rejection-sampling \
#     --template=r1_zero --out-dir=out/rs
# $G sft.py --init-from=$BASE --tokenizer=$TOK --data=mix.jsonl --lr=5e-5 --max-steps=<2 epochs> --out-dir=out/dev3
# 4. reward models (Bradley-Terry on preference pairs; the paper: batch 256, lr 6e-6, one epoch), all-scenario RL
#    with the preference rewards in the last 400 of 1,700 steps at T=0.7
# $G sft.py --objective=preference --init-from=out/dev3 --tokenizer=$TOK --data=helpful_pairs.jsonl --lr=6e-6 \
#     --batch-size=32 --max-steps=<1 epoch> --out-dir=out/rm_helpful   (and out/rm_harmless)
# $G grpo.py --preset=paper --init-from=out/dev3 --tokenizer=$TOK --task=data/reasoning.jsonl --language-weight=1 \
#     --general-task=data/general.jsonl --general-frac=0.5 --general-from-step=1300 --max-steps=1700 \
#     --temperature=0.7 --rm-helpful=out/rm_helpful --rm-harmless=out/rm_harmless --out-dir=out/r1
# Distillation: the teacher's correct samples as SFT data for a smaller dense student (SFT only, no RL)
# $G sft.py --init-from=/path/to/Qwen2.5-Math-7B --tokenizer=/path/to/Qwen2.5-Math-7B/tokenizer.json \
#     --data=distill.jsonl --lr=8e-5 --min-lr-frac=0.1 --max-steps=<2-3 epochs> --out-dir=out/distill_7b
