"""
How good must the privileged context be? The official GRPO, SDPG under the paper's recipe (the
positive gate on) and under the released script's recipe (gate off), and the release recipe with
beta 0 as a control, x seven contexts x seeds, under one floating-point configuration (--fp),
from one warm start per context and seed; a markdown table and a figure.

    python tools/contexts.py                      # the full grid: 4 arms x 7 contexts x 3 seeds
    python tools/contexts.py --quick              # a subset: 4 arms x 4 contexts x seed 0
    python tools/contexts.py --report             # table and figure again from results/contexts/

The contexts (tools/extras.py --context, extras.context_text): the answer; the carries (a hint that is not
the answer); the answer with half its digits hidden; the answer with one digit wrong at chance 0.1,
0.3 and 0.6; another problem's answer. The warm start teaches the teacher view with the same kind
of context at the same noise, so the teacher knows how far to trust it; the student view never
sees any of it. GRPO and the beta-0 control never read the context, but they start RL from the same
warm start as the SDPG arms of that context and seed; the gap of the release recipe to itself with
beta 0 isolates what the distillation term does, the gap to GRPO is the one the paper reports.

Each run is study.py's: `python tools/extras.py <context flags> <study COMMON flags> <arm flags> --seed S`,
200 RL steps, greedy evaluations every 20. Full logs stay in out/contexts/<context>/<arm>_s<seed>/;
the fields used are collected into results/contexts/<context>.jsonl. A finished run is kept.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import study  # noqa: E402  (the runner, collection and statistics of tools/study.py)

CONTEXTS = {  # name: (sdpg.py flags, None); in the order of the table
    "answer": (["--context", "answer"], None),
    "noise0.1": (["--context", "noisy", "--context_noise", "0.1"], None),
    "noise0.3": (["--context", "noisy", "--context_noise", "0.3"], None),
    "noise0.6": (["--context", "noisy", "--context_noise", "0.6"], None),
    "partial": (["--context", "partial"], None),
    "hint": (["--context", "hint"], None),
    "irrelevant": (["--context", "irrelevant"], None),
}
ARMS = {"grpo": "GRPO", "paper_urkl": "paper (gated)", "release": "release (ungated)",  # study.py's arms
        "release_beta0": "release, beta 0"}  # a control: the release recipe without the distillation term
DEFAULT_ARMS = list(ARMS)
QUICK = (["answer", "noise0.3", "hint", "irrelevant"], [0])  # contexts and seeds of --quick
EARLY = 40  # the early evaluation: 20% of the 200 RL steps


GAPS = {  # (arm, reference arm): the paired gaps reported, each on the same context and seed
    ("paper_urkl", "grpo"): "paper - GRPO", ("release", "grpo"): "release - GRPO",
    ("paper_urkl", "release"): "paper - release (the gate)", ("release", "release_beta0"): "release - release beta 0"}


def summarize(runs_by_ctx):
    """Per context, over the seeds (one value per seed in each list):
    arms[arm]: the teacher view's accuracy at the start and the end of RL, the student's final
    accuracy, and for the SDPG arms the distillation signal over all steps: the KL per token, its
    share on the token where wrong rollouts first go wrong, and the KL per token of the rollouts
    the gate keeps (A > 0) over the KL per token of all rollouts;
    gaps[(arm, ref)]: the student's accuracy minus ref's on the same seed, at step EARLY and at the end."""
    out = {}
    for ctx, runs in runs_by_ctx.items():
        arms, gaps = {}, {}
        for arm, seeds in runs.items():
            row = arms.setdefault(arm, {})
            for r in seeds.values():
                ev, rl = r["eval"], r["rl"]
                for k, v in (("teacher_start", ev[0]["teacher_acc"]), ("teacher_end", ev[-1]["teacher_acc"]),
                             ("final", ev[-1]["eval_acc"])):
                    row.setdefault(k, []).append(v)
                if "kl_teacher" in rl[0]:
                    kl = sum(x["kl_teacher"] for x in rl)
                    pos = [x["kl_teacher_pos"] for x in rl if x["tokens_pos"] > 0]
                    for k, v in (("kl", kl / len(rl)), ("wrong_share", sum(x["wrong_kl_share"] * x["kl_teacher"] for x in rl) / kl),
                                 ("pos_ratio", sum(pos) / len(pos) / (kl / len(rl)))):
                        row.setdefault(k, []).append(v)
        for (arm, ref) in GAPS:
            paired = sorted(set(runs.get(arm, {})) & set(runs.get(ref, {})))
            if paired:
                a, b = runs[arm], runs[ref]
                gaps[(arm, ref)] = {
                    "early": [study.acc_at(a[k]["eval"], EARLY) - study.acc_at(b[k]["eval"], EARLY) for k in paired],
                    "final": [a[k]["eval"][-1]["eval_acc"] - b[k]["eval"][-1]["eval_acc"] for k in paired]}
        out[ctx] = {"arms": arms, "gaps": gaps}
    return out


def tables(summary, n_seeds):
    """Markdown: the paired gaps per context, then the teacher view and the distillation signal."""
    gap = lambda xs: "{:+.3f} ± {:.3f}".format(*study.mean_std(xs)) if xs else "-"
    val = lambda xs, d=3: "{:.{d}f} ± {:.{d}f}".format(*study.mean_std(xs), d=d) if xs else "-"
    present = [g for g in GAPS if any(g in c["gaps"] for c in summary.values())]
    lines = ["| context | teacher acc at RL start | GRPO final acc | " + " | ".join(
        f"{GAPS[g]}, step {EARLY} / final" for g in present) + " |", "|---|---|---|" + "---|" * len(present)]
    for ctx, c in summary.items():
        any_arm = c["arms"].get("release") or next(iter(c["arms"].values()))
        lines.append(f"| {ctx} | {val(any_arm['teacher_start'])} | {val(c['arms'].get('grpo', {}).get('final', []))} | "
                     + " | ".join(f"{gap(c['gaps'].get(g, {}).get('early', []))} / {gap(c['gaps'].get(g, {}).get('final', []))}"
                                  for g in present) + " |")
    lines += ["", "| context | arm | student final acc | teacher acc at RL start | teacher acc at end | KL per token | "
              "KL share on the first wrong token | KL per token, A>0 rollouts / all |", "|---|---|---|---|---|---|---|---|"]
    for ctx, c in summary.items():
        for arm in ("paper_urkl", "release"):
            if arm in c["arms"]:
                r = c["arms"][arm]
                lines.append(f"| {ctx} | {ARMS[arm]} | {val(r['final'])} | {val(r['teacher_start'])} | {val(r['teacher_end'])} | "
                             f"{val(r.get('kl', []))} | {val(r.get('wrong_share', []), 2)} | {val(r.get('pos_ratio', []), 2)} |")
    return "\n".join(lines) + (f"\n\nmean ± std over {n_seeds} seed(s); each gap is paired on the seed (the same warm "
                               "start); held-out greedy accuracy on 1000 problems, 200 RL steps. The KL columns "
                               "average all 200 steps (the share weighted by each step's KL).\n")


def figure(summary, runs_by_ctx, out):
    """Left: the final gap of each SDPG arm to GRPO, and of the release recipe to itself
    with beta 0, against the teacher view's accuracy at the start of RL (the context's quality as
    the model reads it), one point per context, bars min to max over seeds. Middle: the same at
    step 40. Right: the teacher view's accuracy over RL per context under
    the release recipe (solid) and the paper recipe (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    markers = {("paper_urkl", "grpo"): "o", ("release", "grpo"): "s", ("release", "release_beta0"): "^"}
    for ax, key, title in ((axes[0], "final", "final gap (step 200)"), (axes[1], "early", f"gap at step {EARLY}")):
        for g, marker in markers.items():
            xs, ys, lo, hi, names = [], [], [], [], []
            for ctx, c in summary.items():
                if g in c["gaps"]:
                    v = c["gaps"][g][key]
                    t = [x for arm in c["arms"].values() for x in arm["teacher_start"]]  # the warm starts'
                    xs.append(sum(t) / len(t) + 0.006 * (list(markers).index(g) - 1))  # side by side
                    ys.append(sum(v) / len(v))
                    lo.append(ys[-1] - min(v))
                    hi.append(max(v) - ys[-1])
                    names.append(ctx)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, capsize=3, label=GAPS[g])
                if marker == "^":  # one label per context, under its lowest series
                    for x, y, n in zip(xs, ys, names):
                        ax.annotate(n, (x, y), fontsize=8, xytext=(4, -12), textcoords="offset points")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("teacher-view accuracy at the start of RL (held-out, greedy)")
        ax.set_ylabel("student accuracy minus the reference arm's, same seed")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (ctx, runs), color in zip(runs_by_ctx.items(), colors):
        for arm, style in (("release", "-"), ("paper_urkl", "--")):
            if arm not in runs:
                continue
            curves = [[r["teacher_acc"] for r in s["eval"]] for s in runs[arm].values()]
            steps = [r["step"] for r in next(iter(runs[arm].values()))["eval"]]
            axes[2].plot(steps, [sum(v) / len(v) for v in zip(*curves)], style, color=color,
                         label=ctx if arm == "release" else None)
    axes[2].set_title("teacher-view accuracy over RL (solid: release, dashed: paper)")
    axes[2].set_xlabel("RL step")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def report(contexts, results, fp="default"):
    runs_by_ctx = {}
    for ctx in contexts:
        path = os.path.join(results, f"{ctx}.jsonl")
        runs = study.load(path) if os.path.exists(path) else {}
        if runs:
            runs_by_ctx[ctx] = runs
    if not runs_by_ctx:
        sys.exit(f"contexts.py: error: no collected runs in {results}; run the grid first")
    summary = summarize(runs_by_ctx)
    n_seeds = max(len(s) for runs in runs_by_ctx.values() for s in runs.values())
    where = "default configuration" if fp == "default" else f"configuration {fp} (--fp {fp})"
    md = f"### The privileged context: SDPG against GRPO, {where}\n\n" + tables(summary, n_seeds)
    with open(os.path.join(results, "contexts.md"), "w") as f:
        f.write(md)
    print(md)
    try:
        print("figure:", figure(summary, runs_by_ctx, os.path.join(results, "contexts.png")))
    except ImportError:
        print("no figure: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="SDPG under privileged contexts of every quality, against GRPO")
    parser.add_argument("--contexts", nargs="+", default=list(CONTEXTS), choices=list(CONTEXTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS), help="the gaps need grpo "
                        "(and release_beta0 for release's gap to itself without distillation)")
    parser.add_argument("--quick", action="store_true", help=f"contexts {' '.join(QUICK[0])}, seed 0 "
                        "(21.5 min on 2 CPU cores from an earlier warm start); its table and figure go to results/contexts_quick/")
    parser.add_argument("--fp", default="default", choices=list(study.FLOAT_CONFIGS),
                        help="floating-point configuration of every run (study.FLOAT_CONFIGS)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--out_dir", default=None, help="the runs' own directories (default: "
                        "out/contexts, or out/contexts_<fp> under --fp)")
    parser.add_argument("--results", default=None, help="collected logs, table, figure (default: "
                        "results/contexts, results/contexts_quick with --quick; + _<fp> under --fp)")
    parser.add_argument("--report", action="store_true", help="only redraw the table and figure from --results")
    args, extra = parser.parse_known_args()  # anything else is passed on to every sdpg.py run
    if args.quick:
        args.contexts, args.seeds = QUICK
    fp = "" if args.fp == "default" else f"_{args.fp}"
    args.out_dir = args.out_dir or os.path.join("out", "contexts" + fp)
    args.results = args.results or os.path.join(study.ROOT, "results", ("contexts_quick" if args.quick else "contexts") + fp)
    os.makedirs(args.results, exist_ok=True)
    if not args.report:
        if args.jobs < 1:
            sys.exit("contexts.py: error: --jobs must be >= 1")
        t0 = time.time()
        study.run_all(args.contexts, args.seeds, args.arms, args.jobs, args.out_dir, extra, CONTEXTS, args.fp)
        for ctx in args.contexts:
            study.collect(ctx, args.out_dir, args.results)
        print(f"contexts: {len(args.contexts)} contexts x {len(args.arms)} arms x {len(args.seeds)} seeds "
              f"in {(time.time() - t0) / 60:.1f} min")
    report(args.contexts, args.results, args.fp)
