"""
The paper's comparison in miniature: the official GRPO, SDPG under the paper's recipe and under
the released script's recipe, each recipe with beta 0 (the paper's "without beta" ablation), and
the official GRPO without its reward penalty, x seeds x regimes (where the warm start stops), from
one cached warm start per seed and regime; markdown tables and a figure.

    python tools/study.py                         # the default regime: 6 arms x 5 seeds
    python tools/study.py --fp compatible --seeds 0 1 2   # the same under a second floating-point configuration
    python tools/study.py --regimes sparse strong --seeds 0 1 2   # RL from a student at 3% and at 40%
    python tools/study.py --arms grpo rlsd distill    # baselines beyond the main six (EXTRA)
    python tools/study.py --report                # tables and figure again from results/study/*.jsonl

Each run is `python tools/extras.py <regime flags> <arm flags> --seed S` (sdpg.py with the study's
logs: loss diagnostics, where the distillation KL falls; see extras.py), one thread each, --jobs at a
time. The warm start of each (regime, seed) runs once; every arm of that seed starts RL from a
copy of its sft.pt (sdpg.py checks the copy's key and prints "reusing"; the study stops if not).
Full logs stay in out/study/<regime>/<arm>_s<seed>/; the fields the tables and figure use are
collected into results/study/<regime>.jsonl (with where each warm start landed), which --report
reads. Under --fp the runs go to out/study_<fp>/ and the results to <regime>_<fp>.*; claims.md
sets the headline comparisons of every regime and configuration collected side by side. A run
whose log is complete is kept, not run again (delete out/study/<regime> to start over). Needs
matplotlib for the figures. Flags that study.py does not know are passed on to every sdpg.py run.

Table columns: final and best held-out greedy accuracy (mean +- std over seeds); steps until the
accuracy first reaches the regime's target (mean over the seeds that reach it, with how many do);
early lift, the accuracy gap to GRPO of the same seed at the evaluation nearest 20% of the steps
(mean +- std of the per-seed gaps); the final gap to GRPO the same way; teacher-view accuracy and
entropy at the end.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# the RL flags every study run shares (the default run is 300 steps with evaluations every 50 and
# 4 samples per problem for mean@4; the study takes 200 steps, greedy evaluations every 20)
COMMON = ["--rl_steps", "200", "--eval_every", "20", "--eval_samples", "0", "--diag_every", "50"]
REGIMES = {  # flags of the warm start (and so of every run) | accuracy target for "steps to target"
    "default": ([], 0.5),  # the warm start stops with the student at 20%
    "sparse": (["--sft_until", "0.03"], 0.05),  # a shorter warm start: the student at 3%
    "strong": (["--sft_until", "0.4"], 0.6),  # a longer one: the student at 40%
    "digits3": (["--digits", "3"], 0.3),  # a harder task, run on request: --regimes digits3
}
ARMS = {  # name: flags on top of sdpg.py's defaults (beta 0.05, alpha 1e-3, urkl)
    "grpo": ["--algo", "grpo"],  # the official GRPO: clip 0.2/0.2, no dual clip, k1 KL 1e-3 in the reward
    "paper_urkl": ["--recipe", "paper"],  # SDPG as the paper ran it: gated, beta triangle, clip 0.2/0.2
    "paper_beta0": ["--recipe", "paper", "--beta", "0"],  # the paper's "without beta" ablation
    "release": ["--recipe", "release"],  # the released script: ungated, constant beta, clip 0.2/0.28
    "release_beta0": ["--recipe", "release", "--beta", "0"],  # the release recipe without distillation
    "grpo_no_kl_reward": ["--algo", "grpo", "--kl_in_reward", "0"],  # official GRPO less its reward penalty
}
EXTRA = {  # run on request with --arms
    "paper_ufkl": ["--recipe", "paper", "--kl_mode", "ufkl"],  # the paper's other reference penalty
    "rlsd": ["--algo", "rlsd"],  # the teacher reweights the advantage (its official script's clip)
    "distill": ["--algo", "distill", "--recipe", "release"],  # L_OPD and L_ref alone, no verifier
    "release_gated": ["--recipe", "release", "--opd_gate", "positive"],  # the release recipe with the gate
    # the teacher's weights: the frozen warm start, or an EMA of the model (rate 0.05 a step)
    "paper_frozen": ["--recipe", "paper", "--teacher", "frozen"],
    "paper_ema": ["--recipe", "paper", "--teacher", "ema"],
    "release_frozen": ["--recipe", "release", "--teacher", "frozen"],
    "release_ema": ["--recipe", "release", "--teacher", "ema"],
    "release_ema01": ["--recipe", "release", "--teacher", "ema", "--ema_rate", "0.01"],  # other rates
    "release_ema20": ["--recipe", "release", "--teacher", "ema", "--ema_rate", "0.2"],
}
SEEDS = {"default": [0, 1, 2, 3, 4], "sparse": [0, 1, 2], "strong": [0, 1, 2], "digits3": [0, 1, 2]}
# Named floating-point configurations of the CPU math libraries (environment variables of every
# run). The same machine, library settings and thread count give the same numbers to the last
# digit; another setting sums in another order, as another CPU would, and a claim that holds
# under two of them is not an accident of one. Check that a setting changes the numbers on your
# machine: "avx2" is the default on a CPU without AVX-512.
FLOAT_CONFIGS = {"default": {},
                 "compatible": {"MKL_CBWR": "COMPATIBLE"},  # MKL's portable kernels (1.5x slower)
                 "avx2": {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},  # an AVX2-only CPU
                 "scalar": {"ATEN_CPU_CAPABILITY": "default"},  # torch's unvectorised kernels (3x)
                 "threads2": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}}  # two threads a run
KEEP = {"eval": ("eval_acc", "teacher_acc", "current_teacher_acc"),  # the fields collected from each log
        "rl": ("reward", "signal_frac", "entropy", "resp_len", "kl_teacher", "kl_ref_k3", "loss_opd", "beta_k", "eot_kl_share",
               "wrong_kl_share", "kl_teacher_pos", "tokens_pos"),
        "diag": ("grad_norm_out", "grad_norm_opd", "grad_norm_ref", "grad_cos_out_opd")}  # rl records with diagnostics


def run_all(regimes, seeds, arms, jobs, out_root, extra, table=None, fp="default", warm_only=False,
            common=COMMON, keep_ckpt=False):
    """Warm starts first (one per regime and seed), then every arm of each seed whose warm start
    reached its bar (a seed that fell short is left out, with a line); at most `jobs` processes.
    seeds: a list, {regime: list}, or None for each regime's SEEDS. table: {regime: (flags,
    ...)}, REGIMES by default. fp: a name in FLOAT_CONFIGS, the math libraries' settings of every
    run. common: the RL flags of every run (not of the warm starts)."""
    table = table or REGIMES
    seeds = seeds if isinstance(seeds, dict) else {r: seeds or SEEDS[r] for r in regimes}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           **FLOAT_CONFIGS[fp]}
    warm = [(r, s, os.path.join(out_root, r, f"warm_s{s}"), table[r][0] + ["--rl_steps", "0", "--eval_samples", "0"])
            for r in regimes for s in seeds[r]]
    runs = [(r, s, os.path.join(out_root, r, f"{a}_s{s}"), table[r][0] + common + {**ARMS, **EXTRA}[a])
            for r in regimes for a in arms for s in seeds[r]]
    runs = [] if warm_only else [run for run in runs if not complete(run[2])]  # finished: kept
    warm = [w for w in warm if not complete(w[2]) and (warm_only or any((r, s) == w[:2] for r, s, _, _ in runs))]
    for phase, todo in (("warm start", warm), ("runs", runs)):
        if phase == "runs":  # RL only from warm starts that reached their bar: else a weaker start
            landed = {(r, s): reached(os.path.join(out_root, r, f"warm_s{s}"))
                      for r, s in dict.fromkeys(run[:2] for run in todo)}
            todo = [run for run in todo if landed[run[:2]]]
        if not todo:
            continue
        pending, active, t0 = list(todo), [], time.time()
        print(f"{phase}: {len(todo)} processes, {jobs} at a time", flush=True)
        while pending or active:
            while pending and len(active) < jobs:
                regime, seed, out, flags = pending.pop(0)
                os.makedirs(out, exist_ok=True)
                if phase == "runs":  # every arm of a seed starts from the same warm-start weights
                    shutil.copy(os.path.join(out_root, regime, f"warm_s{seed}", "sft.pt"), os.path.join(out, "sft.pt"))
                # tools/extras.py is sdpg.py plus the study's logs (diagnostics, where the KL falls, contexts)
                cmd = [sys.executable, os.path.join(ROOT, "tools", "extras.py"), *flags, *extra, "--seed", str(seed),
                       "--out_dir", out]
                with open(os.path.join(out, "stdout.txt"), "w") as f:
                    active.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), out, phase))
            time.sleep(1)
            for p, out, ph in list(active):
                if p.poll() is None:
                    continue
                active.remove((p, out, ph))
                with open(os.path.join(out, "stdout.txt")) as f:
                    text = f.read()
                if p.returncode != 0 or (ph == "runs" and "reusing" not in text):
                    for q, _, _ in active:
                        q.kill()
                    tail = text.strip().splitlines()[-1:] or ["(no output)"]
                    sys.exit(f"study.py: error: {out} failed (exit {p.returncode}): {tail[0]}")
                for junk in (() if keep_ckpt else ("ckpt.pt",)) + (("sft.pt",) if ph == "runs" else ()):
                    if os.path.exists(os.path.join(out, junk)):
                        os.remove(os.path.join(out, junk))
                print(f"  done {out} ({time.time() - t0:.0f}s, {len(pending)} pending)", flush=True)


def read_log(out):  # the records of a run's log.jsonl
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def complete(out):
    """Whether the run in out finished: its log holds the last evaluation (a tool's own records
    may follow it)."""
    try:
        records = read_log(out)
    except (OSError, json.JSONDecodeError):
        return False
    return any(r["phase"] == "eval" and r["step"] == records[0]["rl_steps"] for r in records[1:])


def short_of_bar(records):  # the record sdpg.shortfall logs if the warm start missed its bar
    return next((r for r in records if r.get("reached") is False), None)


def reached(warm):
    """Whether the warm start in directory warm reached its bar; if not, says so: run_all leaves
    that seed out, as its RL would start from a weaker student than the others'."""
    short = short_of_bar(read_log(warm))
    if short:
        print(f"{warm}: the warm start ended short of its bar (val acc {short['val_acc']:.3f}"
              f"): this seed is left out", flush=True)
    return short is None


def tag(regime, fp):  # the name of a regime's collected file under a floating-point configuration
    return regime if fp == "default" else f"{regime}_{fp}"


def collect(regime, out_root, results, fp="default"):
    """The fields KEEP of every finished run's log.jsonl in out_root/<regime> (every arm and seed
    found) into results/<regime>[_<fp>].jsonl: one line per run, {arm, seed, config, eval: {field:
    [...]}, rl: {...}}, values rounded to 5 decimals; and one line per warm start, {arm: "warm",
    seed, config, sft_steps (where it stopped), val_acc, eval_acc, teacher_acc (held-out, RL step 0)}."""
    path = os.path.join(results, f"{tag(regime, fp)}.jsonl")
    found = os.listdir(os.path.join(out_root, regime))
    with open(path, "w") as out:
        for seed in sorted(int(d[6:]) for d in found if d.startswith("warm_s") and d[6:].isdigit()):
            warm_dir = os.path.join(out_root, regime, f"warm_s{seed}")
            if complete(warm_dir):
                records = read_log(warm_dir)
                sft = [r for r in records if r["phase"] == "sft" and "val_acc" in r]
                sft_step = max([r["step"] for r in records if r["phase"] == "sft" and "step" in r] or [0])
                ev = next(r for r in records if r["phase"] == "eval")
                out.write(json.dumps({"arm": "warm", "seed": seed, "config": {k: v for k, v in records[0].items() if k != "phase"},
                                      "sft_steps": sft_step, "val_acc": round(sft[-1]["val_acc"], 5) if sft else None,
                                      "eval_acc": round(ev["eval_acc"], 5), "teacher_acc": round(ev["teacher_acc"], 5)}) + "\n")
        for arm in {**ARMS, **EXTRA}:
            for seed in sorted(int(d[len(arm) + 2:]) for d in found if d.startswith(f"{arm}_s") and d[len(arm) + 2:].isdigit()):
                run_dir = os.path.join(out_root, regime, f"{arm}_s{seed}")
                if not complete(run_dir):
                    continue
                records = read_log(run_dir)
                run = {"arm": arm, "seed": seed, "config": {k: v for k, v in records[0].items() if k != "phase"}}
                for phase, fields in KEEP.items():
                    rows = [r for r in records if r["phase"] == (phase if phase != "diag" else "rl")
                            and (phase != "diag" or "grad_norm_out" in r)]
                    run[phase] = {k: [round(r[k], 5) if k != "step" else r[k] for r in rows]
                                  for k in ("step", *fields) if all(k in r for r in rows)}
                out.write(json.dumps(run) + "\n")
    return path


def load(path):
    """{arm: {seed: {"config": flags, "eval": [records], "rl": [records]}}} from a collected file."""
    runs = {}
    with open(path) as f:
        for line in f:
            run = json.loads(line)
            if run["arm"] == "warm":  # load_warm's
                continue
            as_records = {phase: [dict(zip(cols, vals)) for vals in zip(*cols.values())]
                          for phase, cols in ((p, run.get(p, {})) for p in KEEP)}
            runs.setdefault(run["arm"], {})[run["seed"]] = {"config": run["config"], **as_records}
    return runs


def load_warm(path):
    """{seed: the warm start's collected line} from a collected file."""
    with open(path) as f:
        return {r["seed"]: r for r in map(json.loads, f) if r["arm"] == "warm"}


def mean_std(xs):
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def fmt(xs, d=3):  # "mean ± std" of a list, "-" for none
    return "{:.{d}f} ± {:.{d}f}".format(*mean_std(xs), d=d) if xs else "-"


def acc_at(evals, step):
    """Held-out accuracy at the evaluation nearest to step."""
    return min(evals, key=lambda r: abs(r["step"] - step))["eval_acc"]


def table(runs, target, arms, ref_arm="grpo"):
    """The markdown table of these arms of one regime; the gaps are to ref_arm on the same seed."""
    runs = {a: runs[a] for a in arms if a in runs}
    ref = runs.get(ref_arm, {})
    last = max(r["step"] for r in next(iter(next(iter(runs.values())).values()))["eval"])
    early = round(0.2 * last)
    name = "GRPO" if ref_arm == "grpo" else ref_arm
    lines = [f"| arm | seeds | final acc | best acc | steps to {target:.0%} | early lift vs {name} (step {early}) | "
             f"final gap vs {name} | final teacher acc | final entropy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, seeds in runs.items():
        final = [s["eval"][-1]["eval_acc"] for s in seeds.values()]
        best = [max(r["eval_acc"] for r in s["eval"]) for s in seeds.values()]
        hit = [next((r["step"] for r in s["eval"] if r["eval_acc"] >= target), None) for s in seeds.values()]
        reached = [h for h in hit if h is not None]
        to_target = f"{sum(reached) / len(reached):.0f} ({len(reached)}/{len(hit)} seeds)" if reached else f"never (0/{len(hit)})"
        paired = [k for k in seeds if k in ref]
        lift = fmt([acc_at(seeds[k]["eval"], early) - acc_at(ref[k]["eval"], early) for k in paired]) if paired and arm != ref_arm else "-"
        gap = fmt([seeds[k]["eval"][-1]["eval_acc"] - ref[k]["eval"][-1]["eval_acc"] for k in paired]) if paired and arm != ref_arm else "-"
        teacher = fmt([s["eval"][-1]["teacher_acc"] for s in seeds.values()])
        entropy = fmt([s["rl"][-1]["entropy"] for s in seeds.values()], 2)
        lines.append(f"| {arm} | {len(seeds)} | {fmt(final)} | {fmt(best)} | {to_target} | {lift} | {gap} | {teacher} | {entropy} |")
    config = next(iter(next(iter(runs.values())).values()))["config"]
    return "\n".join(lines) + (f"\n\nmean ± std over seeds (the gaps: over the seeds shared with {name}, "
                               f"paired); held-out greedy accuracy on {config['eval_size']} problems, "
                               f"{config['rl_steps']} RL steps.\n")


def mechanism_table(runs, arms):
    """How large the distillation signal is next to the outcome signal, per arm with both terms:
    the ratio of their gradient norms and the cosine between them at the diagnostic steps (median
    over steps and seeds), and the gated KL as a fraction of the KL over all rollouts in the first
    20 RL steps (how much of the teacher's disagreement the gate lets through)."""
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")
    lines = ["| arm | grad norm opd / out | cosine(out, opd) | gated KL / all-rollout KL, steps 1-20 |",
             "|---|---|---|---|"]
    for arm in arms:
        if arm not in runs or "kl_teacher" not in runs[arm][next(iter(runs[arm]))]["rl"][0]:
            continue
        diag = [d for s in runs[arm].values() for d in s["diag"] if d.get("grad_norm_out", 0) > 0 and d.get("grad_norm_opd", 0) > 0]
        if not diag:  # distill has no outcome term, beta 0 no distillation gradient
            continue
        ratio = median([d["grad_norm_opd"] / d["grad_norm_out"] for d in diag])
        cos = median([d["grad_cos_out_opd"] for d in diag if "grad_cos_out_opd" in d])
        frac = [sum(r["loss_opd"] for r in s["rl"][:20]) / sum(r["kl_teacher"] for r in s["rl"][:20]) for s in runs[arm].values()]
        lines.append(f"| {arm} | {ratio:.3f} | {cos:.2f} | {sum(frac) / len(frac):.3f} |")
    return "\n".join(lines) + "\n"


def smooth(ys, k=10):
    """Trailing moving average over k points (per-step RL metrics are noisy)."""
    return [sum(ys[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(ys))]


def band(ax, steps, curves, color, label, title):
    """One arm on one panel: the mean over seeds as a line, min to max over seeds as a band."""
    ax.plot(steps, [sum(v) / len(v) for v in zip(*curves)], color=color, lw=1.5, label=label)
    ax.fill_between(steps, [min(v) for v in zip(*curves)], [max(v) for v in zip(*curves)],
                    color=color, alpha=0.12)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)


def figure(all_runs, out):
    """One row per regime: student accuracy, its gap to GRPO on the same seed (the seeds' warm
    starts differ, so the paired gap is the sharper comparison), teacher accuracy, entropy,
    response length; mean over seeds as a line, min to max over seeds as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("eval", "eval_acc", "student accuracy (held-out, greedy)"),
              ("eval", "gap", "student accuracy minus GRPO's, same seed"),
              ("eval", "teacher_acc", "teacher-view accuracy (held-out)"),
              ("rl", "entropy", "entropy, nats/token (10-step mean)"),
              ("rl", "resp_len", "response length, tokens (10-step mean)")]
    fig, axes = plt.subplots(len(all_runs), len(panels), figsize=(22, 4.2 * len(all_runs)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (regime, runs) in zip(axes, all_runs.items()):
        for (arm, seeds), color in zip(runs.items(), colors):
            for ax, (phase, key, title) in zip(row, panels):
                if key == "gap":
                    curves = [[r["eval_acc"] - g["eval_acc"] for r, g in zip(s["eval"], runs["grpo"][k]["eval"])]
                              for k, s in seeds.items()]
                else:
                    curves = [[r[key] for r in s[phase]] for s in seeds.values()]
                steps = [r["step"] for r in next(iter(seeds.values()))[phase]]
                if phase == "rl":
                    curves = [smooth(c) for c in curves]
                band(ax, steps, curves, color, arm, f"{regime}: {title}")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def landing_table(regime, results, fps):
    """Where each warm start of a regime landed, under each floating-point configuration collected:
    the student's held-out accuracy at the start of RL (and the warm-start step it stopped at)."""
    bar = float(dict(zip(*[iter(REGIMES[regime][0])] * 2)).get("--sft_until", 0.2))
    lines, worst = [], 0.0
    for fp in fps:
        path = os.path.join(results, f"{tag(regime, fp)}.jsonl")
        warm = load_warm(path) if os.path.exists(path) else {}
        if warm:
            worst = max([worst] + [abs(w["eval_acc"] - bar) for w in warm.values()])
            cells = ", ".join(f"{w['eval_acc']:.3f} ({w['sft_steps']})" for _, w in sorted(warm.items()))
            lines.append(f"| {fp} | {', '.join(str(k) for k in sorted(warm))} | {cells} |")
    head = [f"Warm starts, regime {regime} (bar {bar}): held-out student accuracy at RL step 0 "
            f"(warm-start steps); largest distance from the bar {worst:.3f}", "",
            "| configuration | seeds | student accuracy (steps) |", "|---|---|---|"]
    return "\n".join(head + lines) + "\n" if lines else ""


CLAIMS = [  # (label, arm, reference arm, step: None for the final evaluation)
    ("paper recipe - official GRPO, final", "paper_urkl", "grpo", None),
    ("release recipe - official GRPO, final", "release", "grpo", None),
    ("GRPO without its reward penalty - official GRPO, final", "grpo_no_kl_reward", "grpo", None),
    ("paper recipe - paper beta 0, final", "paper_urkl", "paper_beta0", None),
    ("release recipe - release beta 0, final", "release", "release_beta0", None),
    ("release recipe - release beta 0, step 40", "release", "release_beta0", 40)]


def claims_table(columns, results):
    """The headline comparisons side by side, one column per (regime, configuration): each a paired
    gap in final held-out accuracy, mean +- std over seeds, with how many seeds are ahead."""
    data = {}
    for regime, fp in columns:
        path = os.path.join(results, f"{tag(regime, fp)}.jsonl")
        runs = load(path) if os.path.exists(path) else {}
        if runs:  # a configuration with warm starts alone has no comparison to show
            data[(regime, fp)] = runs
    lines = ["| comparison | " + " | ".join(f"{r}, {fp}" for r, fp in data) + " |",
             "|---|" + "---|" * len(data)]
    def cell(runs, arm, ref, step):
        if arm not in runs or ref not in runs:
            return "-"
        seeds = [k for k in runs[arm] if k in runs[ref]]
        at = (lambda e: e[-1]["eval_acc"]) if step is None else (lambda e: acc_at(e, step))
        gaps = [at(runs[arm][k]["eval"]) - at(runs[ref][k]["eval"]) for k in seeds]
        m, sd = mean_std(gaps)
        return f"{m:+.3f} ± {sd:.3f} ({sum(g > 0 for g in gaps)}/{len(gaps)} ahead)"
    start = [" / ".join(f"{runs['grpo'][k]['eval'][0]['eval_acc']:.2f}" for k in sorted(runs["grpo"]))
             if "grpo" in runs else "-" for runs in data.values()]
    lines.append("| student accuracy at the start of RL, per seed | " + " | ".join(start) + " |")
    final = [("{:.3f} ± {:.3f}".format(*mean_std([s["eval"][-1]["eval_acc"] for s in runs["grpo"].values()]))
              if "grpo" in runs else "-") for runs in data.values()]
    lines.append("| official GRPO, final accuracy | " + " | ".join(final) + " |")
    for label, arm, ref, step in CLAIMS:
        lines.append(f"| {label} | " + " | ".join(cell(runs, arm, ref, step) for runs in data.values()) + " |")
    return "\n".join(lines) + "\n"


def report(regimes, results, fp="default"):
    all_runs = {}
    for regime in regimes:
        path = os.path.join(results, f"{tag(regime, fp)}.jsonl")
        if not os.path.exists(path):
            sys.exit(f"study.py: error: {path} does not exist; run the study first")
        all_runs[regime] = load(path)
        arms = [a for a in {**ARMS, **EXTRA} if a in all_runs[regime]]
        md = f"### Regime: {regime}\n\n" + table(all_runs[regime], REGIMES[regime][1], arms)
        for ref_arm, with_beta in (("paper_beta0", ["paper_urkl", "paper_ufkl"]), ("release_beta0", ["release"])):
            if ref_arm in all_runs[regime]:  # what the distillation term adds: each arm against itself with beta 0
                md += (f"\n### Regime: {regime}, gaps to {ref_arm}\n\n" +
                       table(all_runs[regime], REGIMES[regime][1], [ref_arm, *with_beta], ref_arm))
        md += f"\n### Regime: {regime}, the distillation signal\n\n" + mechanism_table(all_runs[regime], arms)
        with open(os.path.join(results, f"{tag(regime, fp)}.md"), "w") as f:
            f.write(md)
        print(md)
    # every regime and configuration collected so far, side by side: claims.md
    found = [(r, c) for r in REGIMES for c in FLOAT_CONFIGS if os.path.exists(os.path.join(results, f"{tag(r, c)}.jsonl"))]
    md = "### The headline comparisons under each configuration\n\n" + claims_table(found, results)
    for regime in dict(found):
        md += "\n" + landing_table(regime, results, [c for r, c in found if r == regime])
    with open(os.path.join(results, "claims.md"), "w") as f:
        f.write(md)
    print(md)
    suffix = "" if regimes == ["default"] else "_" + "_".join(regimes)  # study.png: the default regime
    suffix += "" if fp == "default" else f"_{fp}"
    try:
        main = {regime: {a: runs[a] for a in {**ARMS, **EXTRA} if a in runs} for regime, runs in all_runs.items()}
        print("figure:", figure(main, os.path.join(results, f"study{suffix}.png")))
    except ImportError:
        print("no figure: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="SDPG vs baselines and ablations, several seeds and regimes")
    parser.add_argument("--regimes", nargs="+", default=["default"], choices=list(REGIMES))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS) + list(EXTRA))
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0-4 in the default regime, 0-2 otherwise")
    parser.add_argument("--fp", default="default", choices=list(FLOAT_CONFIGS),
                        help="floating-point configuration of every run (FLOAT_CONFIGS); its runs go to "
                             "out/study_<fp>/ and results/study/<regime>_<fp>.*")
    parser.add_argument("--warm_only", action="store_true", help="only the warm starts: where they land")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--keep_ckpt", action="store_true", help="keep each run's final ckpt.pt (for tools/passk.py)")
    parser.add_argument("--out_dir", default=None, help="the runs' own directories (default: out/study, "
                        "or out/study_<fp> under --fp)")
    parser.add_argument("--results", default=os.path.join(ROOT, "results", "study"), help="collected logs, tables, figure")
    parser.add_argument("--report", action="store_true", help="only redraw the tables and figure from --results")
    args, extra = parser.parse_known_args()  # anything else is passed on to every sdpg.py run
    args.out_dir = args.out_dir or os.path.join("out", "study" if args.fp == "default" else f"study_{args.fp}")
    os.makedirs(args.results, exist_ok=True)
    if not args.report:
        if args.jobs < 1 or ("grpo" not in args.arms and not args.warm_only):
            sys.exit("study.py: error: --jobs must be >= 1 and the arms must include grpo (the gaps are to it)")
        t0 = time.time()
        run_all(args.regimes, args.seeds, args.arms, args.jobs, args.out_dir, extra, fp=args.fp,
                warm_only=args.warm_only, keep_ckpt=args.keep_ckpt)
        for regime in args.regimes:
            collect(regime, args.out_dir, args.results, args.fp)
        print(f"study: {len(args.regimes)} regime(s) x {len(args.arms)} arms in {(time.time() - t0) / 60:.1f} min")
    if args.warm_only:
        for regime in args.regimes:
            print(landing_table(regime, args.results, [args.fp]))
    else:
        report(args.regimes, args.results, args.fp)
