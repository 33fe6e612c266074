#!/usr/bin/env bash
# GPU check of this SDPG implementation: one pass on a CUDA machine, every figure in one results file.
#
#   bash tools/gpu_check.sh [RESULTS_FILE]    # default ${OUT:-results}/gpu_check.txt; runs from the repo root
#
# Each step is timed and has its own timeout (cap; expected on an H100-class GPU):
#   b. python sdpg.py, the defaults (bf16 on CUDA): wall time, median RL step time (dt),
#      median tok_per_s, the eval table                                         cap  90 s  (30-60 s)
#   c. the same with --dtype float32                                            cap  90 s  (30-60 s)
#   d. the same with --compile (warm start: b's sft.pt)                         cap 100 s  (compile + RL)
#   e. torchrun --standalone --nproc_per_node 1 sdpg.py, nccl (b's sft.pt)      cap  60 s  (RL only)
#   f. tools/gpu_hook.py: the first mini-batch's PPO ratio and clip fraction
#      in bf16, before any update (plus the hook's self-test)                   cap  30 + 45 s
#   g. tools/bench.py --only rollout --only gpu_kl: rollout tokens/s; fused vs
#      naive exact KL at V = 50304 as N doubles until naive OOMs                cap 120 s  (~60 s)
#   h. tools/bench_approx.py --device cuda at N = 16384 (8192 for the full-logit cases at
#      V = 151936): memory and time of the fused exact KL beside the plain exact term, top-k and
#      the sampled token, as results/approx/bench_cpu.txt on the CPU                cap 150 s
#   a. the test suite, python -m pytest -q test_sdpg.py: its pass/fail line     cap 200 s  (~3 min on 16 cores)
# a runs last: the tests run on the CPU (they pass --device cpu), so every GPU figure comes first.
# Budget: no step starts after GUARD_S = 420 s (7 min; the rest print "skipped: time budget"), and
# every timeout is cut to end by DEADLINE_S = 465 s, so the script ends within 8 minutes.
#
# The goals it reports on (figures only; nothing is asserted, the exit status is 0):
#   the default run takes <= 30 s; at V = 50304 and N >= 16k the fused KL's memory and time relative
#   to the naive path, and whether naive OOMs before fused; the bf16 ratio at the first mini-batch
#   (pi_theta = pi_old there, so clip_frac0 should be about 0).
#
# Without CUDA (torch.cuda.is_available() False) a-e and g's GPU part print "skipped: no CUDA"; the
# hook's self-test, a tiny CPU run of the hook script and bench's rollout part run (under a minute).
# Environment: PYTHON (default python), STEPS (default "b c d e f g a": which steps, in order),
# LOGS_DIR (if set, each step's output and log.jsonl are copied there as well).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

RESULT=${1:-${OUT:-results}/gpu_check.txt}
PY=${PYTHON:-python}
STEPS=${STEPS:-"b c d e f g h a"}
LOGS_DIR=${LOGS_DIR:-}
GUARD_S=420      # no step starts after this many seconds
DEADLINE_S=465   # every timeout ends by then
START=$SECONDS
mkdir -p "$(dirname "$RESULT")" || exit 1
: > "$RESULT" || exit 1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

say() { printf '%s\n' "$*" | tee -a "$RESULT"; }
elapsed() { echo $(( SECONDS - START )); }
section() { say ""; say "## $1. $2"; say ""; }

# run_cmd NAME CAP CMD...: CMD, output in $TMP/NAME.log, timeout min(CAP, seconds left to DEADLINE_S).
# Sets RC, WALL (seconds, one decimal) and LIMIT.
run_cmd() {
    local name=$1 cap=$2 left
    shift 2
    left=$(( DEADLINE_S - (SECONDS - START) ))
    LIMIT=$(( cap < left ? cap : left ))
    if (( LIMIT < 5 )); then
        RC=124; WALL=0; echo "not run: the time budget is spent" > "$TMP/$name.log"; return
    fi
    local t0=$EPOCHREALTIME
    timeout -k 5 "$LIMIT" "$@" > "$TMP/$name.log" 2>&1
    RC=$?
    WALL=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    if [[ -n $LOGS_DIR ]]; then mkdir -p "$LOGS_DIR" && cp "$TMP/$name.log" "$LOGS_DIR/$name.out"; fi
}

last_line() { grep -v '^[[:space:]]*$' "$TMP/$1.log" | tail -n 1 | cut -c1-300; }

# status NAME: one line after run_cmd, with the wall time; on a failure the output's last lines too
status() {
    if (( RC == 0 )); then
        say "ok | wall ${WALL} s"
        return
    fi
    if (( RC == 124 || RC == 137 )); then
        say "timed out after ${LIMIT} s | wall ${WALL} s | last line: $(last_line "$1")"
    else
        say "failed (exit $RC) | wall ${WALL} s | last line: $(last_line "$1")"
    fi
    grep -v '^[[:space:]]*$' "$TMP/$1.log" | tail -n 8 | cut -c1-300 | sed 's/^/    | /' | tee -a "$RESULT"
}

# guard STEP TITLE: true if the step may start; otherwise prints why not
guard() {
    if (( SECONDS - START > GUARD_S )); then
        section "$1" "$2"
        say "skipped: time budget ($(elapsed) s elapsed > ${GUARD_S} s)"
        return 1
    fi
}

# the summary of one sdpg.py run from its log.jsonl; with --row, one line of the comparison table
cat > "$TMP/summary.py" <<'EOF'
import json, os, statistics, sys

row = sys.argv[1] == "--row"
label, out_dir, wall, rc = sys.argv[2:6] if row else (None, *sys.argv[1:4])
recs = []
try:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except ValueError:
                pass
except OSError:
    pass
by = lambda phase: [r for r in recs if r.get("phase") == phase]  # noqa: E731
cfg, rl, ev, sft = (by("config") or [{}])[0], by("rl"), by("eval"), by("sft")
med = lambda k: statistics.median(r[k] for r in rl if k in r) if any(k in r for r in rl) else float("nan")  # noqa: E731
last_acc = f"{ev[-1]['eval_acc']:.3f}" if ev else "-"
if row:
    print(f"| {label} | {'ok' if rc == '0' else 'exit ' + rc} | {wall} | {len(rl)} | {1000 * med('dt'):.1f} | "
          f"{med('tok_per_s'):.0f} | {last_acc} |")
    sys.exit(0)
if not recs:
    print("no log.jsonl records")
    sys.exit(0)
print(f"config: device {cfg.get('device')} | dtype {cfg.get('dtype')} | compile {cfg.get('compile')} | "
      f"world_size {cfg.get('world_size')} | torch {cfg.get('torch')}")
val, steps = [r for r in sft if "val_acc" in r], [r["step"] for r in sft if "step" in r]
print("warm start: " + (f"{max(steps)} steps" if steps else "none run (sft.pt reused)")
      + (f" | student val acc {val[-1]['val_acc']:.3f}" if val else ""))
if rl:
    print(f"RL: {len(rl)} steps | median dt {1000 * med('dt'):.1f} ms | median tok_per_s {med('tok_per_s'):.0f} | "
          f"sum of dt {sum(r.get('dt', 0) for r in rl):.1f} s")
    phases = [k for k in dict.fromkeys(k for r in rl for k in r) if k.startswith("dt_")]  # dt_rollout, ...
    if phases:
        print("median phase times (ms): " + ", ".join(f"{k[3:]} {1000 * med(k):.1f}" for k in phases))
hook = [r for r in rl if "ratio_mean" in r]
for r in hook:
    print(f"hook fields in log.jsonl, rl step {r['step']}: " + " | ".join(
        f"{k} {r[k]:.6g}" for k in ("ratio_mean", "ratio_maxdev", "clip_frac0", "ratio_tokens") if k in r))
if ev:
    keys = ["step", "eval_acc", "teacher_acc"]
    keys += [k for k in dict.fromkeys(k for r in ev for k in r) if k.startswith("mean@")]
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in ev:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for k in keys) + " |")
EOF

# run_sdpg STEP TITLE CAP SFT_FROM CMD...: a training run into $TMP/STEP (SFT_FROM: a run whose
# sft.pt to start from, or ""), its status, summary and a row of the comparison table
run_sdpg() {
    local step=$1 title=$2 cap=$3 sft_from=$4 dir note=""
    shift 4
    dir=$TMP/$step
    mkdir -p "$dir"
    if [[ -n $sft_from && -f $sft_from/sft.pt ]]; then
        cp "$sft_from/sft.pt" "$dir/" && note=" (b's sft.pt copied in: reused if its key matches)"
    fi
    section "$step" "$title"
    say "command: $* --out_dir $dir$note"
    run_cmd "$step" "$cap" "$@" --out_dir "$dir"
    status "$step"
    "$PY" "$TMP/summary.py" "$dir" "$WALL" "$RC" | tee -a "$RESULT"
    "$PY" "$TMP/summary.py" --row "$step. $title" "$dir" "$WALL" "$RC" >> "$TMP/rows.md"
    if [[ -n $LOGS_DIR && -f $dir/log.jsonl ]]; then cp "$dir/log.jsonl" "$LOGS_DIR/$step.log.jsonl"; fi
}

# -----------------------------------------------------------------------------
# the machine

CUDA=$("$PY" -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null | tail -n 1)
say "# SDPG GPU check | $(date -u '+%Y-%m-%d %H:%M UTC') | $(hostname)"
say ""
say "repository: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$( [[ -n $(git status --porcelain 2>/dev/null) ]] && echo ' (uncommitted changes)')"
say "python: $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1 | tail -n 1) | $("$PY" -c 'import torch, numpy, tiktoken; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) | numpy {numpy.__version__} | tiktoken {tiktoken.__version__}")' 2>&1 | tail -n 1)"
say "CPU cores: $(nproc) | CUDA available: ${CUDA:-unknown}"
if [[ $CUDA == True ]]; then
    say "GPU: $("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB")' 2>&1 | tail -n 1)"
    command -v nvidia-smi > /dev/null && say "nvidia-smi: $(timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)"
fi
say "steps: $STEPS | guard ${GUARD_S} s | deadline ${DEADLINE_S} s"

# -----------------------------------------------------------------------------
# the steps

step_b() { run_sdpg b "default run: python sdpg.py" 90 "" "$PY" sdpg.py
           say ""; say "goal: default run <= 30 s: wall ${WALL} s ($(awk -v w="$WALL" 'BEGIN { print (w <= 30 ? "met" : "not met") }'))"; }
step_c() { run_sdpg c "float32: python sdpg.py --dtype float32" 90 "" "$PY" sdpg.py --dtype float32; }
step_d() { run_sdpg d "compiled: python sdpg.py --compile" 100 "$TMP/b" "$PY" sdpg.py --compile; }
step_e() { run_sdpg e "DDP: torchrun --standalone --nproc_per_node 1 sdpg.py (nccl)" 60 "$TMP/b" \
                    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 sdpg.py; }

step_f() {
    local title="first mini-batch PPO ratio, before any update: tools/gpu_hook.py" dir=$TMP/f
    section f "$title"
    say "self-test (ratio_hook on a random model, fp32 and bf16): python tools/gpu_hook.py --selftest"
    run_cmd f_selftest 30 "$PY" tools/gpu_hook.py --selftest
    status f_selftest
    grep -E '^gpu_hook' "$TMP/f_selftest.log" | cut -c1-300 | sed 's/^/    /' | tee -a "$RESULT"
    local flags=(--rl_steps 2 --eval_every 0 --eval_samples 0)
    if [[ $CUDA == True ]]; then
        say ""
        say "the run, in bf16 (the CUDA default), warm start: b's sft.pt if there is one"
    else  # the tests' tiny configuration, on the CPU, in fp32: the ratio is 1 there
        flags+=(--device cpu --sft_steps 10 --eval_size 40 --prompts_per_step 4 --group_size 4
                --n_layer 1 --n_embd 32 --n_head 2 --sft_batch 16)
        say ""
        say "CPU smoke of the hook script (the tests' tiny model, fp32: the ratio should be 1)"
    fi
    mkdir -p "$dir"
    [[ $CUDA == True && -f $TMP/b/sft.pt ]] && cp "$TMP/b/sft.pt" "$dir/"
    say "command: $PY tools/gpu_hook.py ${flags[*]} --out_dir $dir"
    run_cmd f "$([[ $CUDA == True ]] && echo 45 || echo 90)" "$PY" tools/gpu_hook.py "${flags[@]}" --out_dir "$dir"
    status f
    "$PY" "$TMP/summary.py" "$dir" "$WALL" "$RC" | grep -E '^(config|hook|RL)' | tee -a "$RESULT"
    if [[ -f $dir/log.jsonl ]] && ! grep -q '"ratio_mean"' "$dir/log.jsonl"; then
        say "no ratio fields in log.jsonl; the hook printed: $(grep -E '^gpu_hook:' "$TMP/f.log" | tail -n 1 | cut -c1-300)"
    fi
    if [[ -n $LOGS_DIR && -f $dir/log.jsonl ]]; then cp "$dir/log.jsonl" "$LOGS_DIR/f.log.jsonl"; fi
}

step_g() {
    section g "benchmark: python tools/bench.py --only rollout --only gpu_kl"
    local cap=120 repeats=() left
    [[ $CUDA == True ]] || { cap=60; repeats=(--repeats 1); }
    left=$(( DEADLINE_S - (SECONDS - START) ))
    local budget=$(( (cap < left ? cap : left) - 30 ))  # part 4 starts no new N after this; the rest for startup and rollouts
    (( budget < 10 )) && budget=10
    say "command: $PY tools/bench.py --only rollout --only gpu_kl --gpu_budget_s $budget ${repeats[*]}"
    run_cmd g "$cap" "$PY" tools/bench.py --only rollout --only gpu_kl --gpu_budget_s "$budget" "${repeats[@]}"
    status g
    say ""
    sed -n '/^## /,$p' "$TMP/g.log" | sed 's/^## /### bench: /' | tee -a "$RESULT"
}

step_h() {
    local table="$(dirname "$RESULT")/approx_gpu.txt"
    section h "the approximations of the KL: python tools/bench_approx.py --device cuda"
    say "command: $PY tools/bench_approx.py --device cuda --tokens 16384 --big_vocab_tokens 8192 --out $table"
    run_cmd h 150 "$PY" tools/bench_approx.py --device cuda --tokens 16384 --big_vocab_tokens 8192 --out "$table"
    status h
    grep -E '^\|' "$TMP/h.log" | tee -a "$RESULT"
}

step_a() {
    section a "test suite: python -m pytest -q test_sdpg.py"
    run_cmd a 200 "$PY" -m pytest -q test_sdpg.py
    status a
    say "pytest: $(last_line a)"
    grep -E '^(FAILED|ERROR) ' "$TMP/a.log" | head -n 10 | cut -c1-300 | sed 's/^/    /' | tee -a "$RESULT"
}

declare -A TITLES=([a]="test suite" [b]="default run" [c]="float32" [d]="compiled" [e]="DDP under torchrun"
                   [f]="first mini-batch PPO ratio" [g]="benchmark" [h]="approximations of the KL")
for s in $STEPS; do
    [[ -n ${TITLES[$s]:-} ]] || { say ""; say "unknown step $s (use a to h)"; continue; }
    guard "$s" "${TITLES[$s]}" || continue
    if [[ $CUDA != True && $s =~ ^[a-eh]$ ]]; then
        section "$s" "${TITLES[$s]}"
        say "skipped: no CUDA"
        continue
    fi
    "step_$s"
    say "(step $s: $(elapsed) s since the start)"
done

if [[ -s $TMP/rows.md ]]; then
    section "summary" "the training runs"
    say "| run | status | wall (s) | RL steps | median dt (ms) | median tok/s | final eval_acc |"
    say "|---|---|---|---|---|---|---|"
    tee -a "$RESULT" < "$TMP/rows.md"
fi
say ""
say "total: $(elapsed) s | results: $RESULT"
exit 0
