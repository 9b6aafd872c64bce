#!/usr/bin/env bash
# The measured alignment runs of issue 17, one after another, each resumable: a run that
# finished (result.json) is skipped, an interrupted one continues from its checkpoint.
#
#   nohup bash benchmarks/align_runs.sh ~/runs/align phantoms > ~/runs/align.log 2>&1 &
#   python benchmarks/align_summary.py ~/runs/align --reference phantoms=0.992 \
#       --reference openkbp=0.759 --png curves.png
#
# TASK: phantoms (train on phantoms:headneck/train, evaluate on phantoms:headneck/test with
# phantom_headneck) or openkbp (train on OpenKBP train-pats, evaluate on validation-pats with
# headneck_rtog; OPENKBP=~/.cache/dosegym/openkbp by default). AGENTS and SEEDS (env) pick
# the runs; SAMPLES is the budget of every run (the same for every agent).
# The GuidedDose agents (phantoms only, as issue 17 asks): AGENTS="ppo_guided sac_guided".
# RESULTS (default benchmarks/results/align): where each finished run's result.json is copied,
# as RESULTS/TASK/AGENT-sSEED/result.json, to be committed (a few tens of kB each): the
# measured runs outlive the machine, and align_summary.py reads that folder like a run folder.
# A run whose result is already there is skipped.
# EVAL_EVERY (iterations between evaluations; default: the config's, 16 for openkbp, whose 33
# validation patients cost ~10 minutes an evaluation here) and DIVERSITY (samples per eval case
# for the diversity; default 4, 2 for openkbp).
set -euo pipefail
OUT=${1:?usage: align_runs.sh OUT_DIR TASK}
TASK=${2:?usage: align_runs.sh OUT_DIR TASK}
AGENTS=${AGENTS:-"ddpo ppo best_of_n"}
SEEDS=${SEEDS:-"0 1 2"}
SAMPLES=${SAMPLES:-256}
OPENKBP=${OPENKBP:-$HOME/.cache/dosegym/openkbp}
HERE="$(cd "$(dirname "$0")/.." && pwd)"
RESULTS=${RESULTS:-$HERE/benchmarks/results/align}

case "$TASK" in
  phantoms) DATA=(--cases phantoms:headneck/train --eval-cases phantoms:headneck/test --scorecard phantom_headneck)
    EVAL_EVERY=${EVAL_EVERY:-}; DIVERSITY=${DIVERSITY:-4} ;;
  openkbp) DATA=(--cases "$OPENKBP/train-pats" --eval-cases "$OPENKBP/validation-pats" --scorecard headneck_rtog)
    EVAL_EVERY=${EVAL_EVERY:-16}; DIVERSITY=${DIVERSITY:-2} ;;
  *) echo "unknown task $TASK (phantoms or openkbp)"; exit 2 ;;
esac
if [ -n "$EVAL_EVERY" ]; then DATA+=(--eval-every "$EVAL_EVERY"); fi

for agent in $AGENTS; do
  for seed in $SEEDS; do
    run="$OUT/$TASK/$agent-s$seed"
    kept="$RESULTS/$TASK/$agent-s$seed/result.json"
    if [ -f "$kept" ]; then echo "done: $kept"; continue; fi
    if [ -f "$run/result.json" ]; then mkdir -p "$(dirname "$kept")"; cp "$run/result.json" "$kept"; echo "done: $run"; continue; fi
    resume=()
    if [ -f "$run/run.json" ]; then resume=(--resume); fi
    echo "$(date -u +%FT%TZ) start $run ${resume[*]}"
    dosegym align --agent "$agent" --config "$HERE/dosegym/agents/configs/$agent.yaml" --seed "$seed" \
      --samples "$SAMPLES" --out "$run" --diversity-samples "$DIVERSITY" --no-progress "${DATA[@]}" "${resume[@]}"
    mkdir -p "$(dirname "$kept")"
    cp "$run/result.json" "$kept.partial" && mv "$kept.partial" "$kept"
    echo "$(date -u +%FT%TZ) end $run"
  done
done
