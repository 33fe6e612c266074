"""
Which weights the teacher should use, and what distillation costs in pass@k: the tables of a
teacher study (study.py's frozen and EMA arms beside the current teacher, each recipe's beta-0
control and the official GRPO, from one warm start per seed) and of tools/passk.py's curves.

The default task (study.py's runner and its default regime):

    python tools/study.py --keep_ckpt --arms grpo paper_urkl paper_frozen paper_ema paper_beta0 \\
        release release_frozen release_ema release_beta0 --out_dir out/teachers --results results/teachers
    python tools/passk.py --study out/teachers/default --jsonl results/teachers/passk.jsonl \\
        --figure results/teachers/passk.png
    python tools/study.py --arms grpo release_ema01 release_ema20 --out_dir out/teachers \\
        --results results/teachers      # the EMA teacher at rates 0.01 and 0.2 (EMA_RATES)

The chain task with the derivation as context (tools/chain.py's warm start and RL flags; the
release recipe with each teacher, its beta-0 control and GRPO; seeds 0-2, 5 and 6 as chain.py's):

    python tools/teachers.py --chain                  # runs, then passk.py, then the tables

Then the tables of both tasks (teachers.md):

    python tools/teachers.py                          # from results/teachers
    python tools/teachers.py --fp compatible          # the same study under study.py --fp compatible

Gaps are paired by seed: mean ± std of the per-seed differences, with the seeds ahead. "The
model's view" is the privileged view (c + x) of the weights being trained (current_teacher_acc
under frozen and ema, teacher_acc under current); "the teacher's view" that of the weights the
teacher uses.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chain  # noqa: E402
import study  # noqa: E402
from study import fmt, load, mean_std  # noqa: E402

RECIPES = {"paper": ("paper_urkl", "paper_frozen", "paper_ema", "paper_beta0"),
           "release": ("release", "release_frozen", "release_ema", "release_beta0")}
TEACHER = {"paper_urkl": "current", "release": "current", "paper_frozen": "frozen",
           "release_frozen": "frozen", "paper_ema": "ema", "release_ema": "ema"}
KS = (1, 2, 4, 8, 16)
TASKS = {"default": "default task, student at 20%, 200 RL steps",  # collected name: what it is
         "derivation": "chain task, the derivation as context, student at 30%, 100 RL steps"}
CHAIN_ARMS = ["grpo", "release", "release_frozen", "release_ema", "release_beta0"]
EMA_RATES = {"release_ema01": 0.01, "release_ema": 0.05, "release_ema20": 0.2}  # study.py's arms


def passk_path(results, task, fp):  # passk[_derivation][_<fp>].jsonl: a task's pass@k records
    return os.path.join(results, "passk" + ("" if task == "default" else "_" + task)
                        + ("" if fp == "default" else f"_{fp}") + ".jsonl")


def run_chain(seeds, fp, results, jobs=2):
    """The chain task's teacher study: CHAIN_ARMS from each seed's warm start (chain.py's STUDY and
    RL flags), every final checkpoint kept; then collected to <results>/derivation[_<fp>].jsonl
    and pass@k of every run and warm start to passk_derivation[_<fp>].jsonl (written anew)."""
    out_root = os.path.join("out", "teachers_chain" if fp == "default" else f"teachers_chain_{fp}")
    study.run_all(["derivation"], {"derivation": seeds}, CHAIN_ARMS, jobs, out_root, [],
                  table=chain.STUDY, fp=fp, common=chain.RL, keep_ckpt=True)
    study.collect("derivation", out_root, results, fp)
    jsonl = passk_path(results, "derivation", fp)
    if os.path.exists(jsonl):
        os.remove(jsonl)
    subprocess.run([sys.executable, os.path.join(study.ROOT, "tools", "passk.py"), "--study",  # under fp too
                    os.path.join(out_root, "derivation"), "--jsonl", jsonl, "--figure", jsonl[:-len(".jsonl")] + ".png"],
                   env={**os.environ, **study.FLOAT_CONFIGS[fp]}, check=True)


def gap(runs, arm, ref, value):
    """'mean ± std (ahead/n)' of value(arm) - value(ref) over the seeds both have."""
    seeds = sorted(set(runs.get(arm, {})) & set(runs.get(ref, {})))
    d = [value(runs[arm][s]) - value(runs[ref][s]) for s in seeds]
    if not d:
        return "-"
    m, s = mean_std(d)
    return f"{m:+.3f} ± {s:.3f} ({sum(x > 0 for x in d)}/{len(d)})"


def final(key):
    return lambda run: run["eval"][-1][key]


def model_view(run):  # the weights being trained, reading c
    return run["eval"][-1].get("current_teacher_acc", run["eval"][-1]["teacher_acc"])


def accuracy_table(runs):
    rows = ["| arm | teacher | seeds | final accuracy | - same recipe, current teacher | - its beta-0 control "
            "| - official GRPO | teacher's view, final | model's view, final (lowest over RL) | KL to the teacher, "
            "last 20 steps | entropy, last 20 steps |", "|" + "---|" * 11]
    for recipe, arms in RECIPES.items():
        current, *_, control = arms
        for arm in arms:
            if arm not in runs:
                continue
            seeds = runs[arm]
            lowest = [min(r.get("current_teacher_acc", r["teacher_acc"]) for r in run["eval"]) for run in seeds.values()]
            kl = [sum(r["kl_teacher"] for r in run["rl"][-20:]) / 20 for run in seeds.values() if "kl_teacher" in run["rl"][-1]]
            ent = [sum(r["entropy"] for r in run["rl"][-20:]) / 20 for run in seeds.values()]
            rows.append(f"| {arm} | {TEACHER.get(arm, 'none (beta 0)')} | {len(seeds)} | "
                        f"{fmt([final('eval_acc')(r) for r in seeds.values()])} | "
                        f"{gap(runs, arm, current, final('eval_acc')) if arm != current and arm != control else '-'} | "
                        f"{gap(runs, arm, control, final('eval_acc')) if arm != control else '-'} | "
                        f"{gap(runs, arm, 'grpo', final('eval_acc'))} | "
                        f"{fmt([final('teacher_acc')(r) for r in seeds.values()]) if arm != control else '-'} | "
                        f"{fmt([model_view(r) for r in seeds.values()])} ({fmt(lowest)}) | {fmt(kl)} | {fmt(ent, 2)} |")
    if "grpo" in runs:
        seeds = runs["grpo"]
        rows.append(f"| grpo | none | {len(seeds)} | {fmt([final('eval_acc')(r) for r in seeds.values()])} | - | - | - | - | "
                    f"{fmt([model_view(r) for r in seeds.values()])} | - | "
                    f"{fmt([sum(r['entropy'] for r in run['rl'][-20:]) / 20 for run in seeds.values()], 2)} |")
    return "\n".join(rows)


def rate_table(runs):
    """The release recipe's EMA teacher at each rate of EMA_RATES run: final accuracy, its gaps to
    the current teacher and to the default rate 0.05, the teacher's and the model's view."""
    rows = ["| EMA rate a step | seeds | final accuracy | - current teacher | - rate 0.05 | teacher's view, final "
            "| model's view, final |", "|" + "---|" * 7]
    for arm, rate in EMA_RATES.items():
        if arm in runs:
            seeds = runs[arm]
            rows.append(f"| {rate} | {len(seeds)} | {fmt([final('eval_acc')(r) for r in seeds.values()])} | "
                        f"{gap(runs, arm, 'release', final('eval_acc'))} | "
                        f"{gap(runs, arm, 'release_ema', final('eval_acc')) if arm != 'release_ema' else '-'} | "
                        f"{fmt([final('teacher_acc')(r) for r in seeds.values()])} | "
                        f"{fmt([model_view(r) for r in seeds.values()])} |")
    return "\n".join(rows)


def passk_table(path):
    """pass@k at the end of RL per arm (mean ± std over seeds), its paired gaps to the seed's warm
    start and to GRPO, and the smallest k at which the arm's mean falls below the warm start's."""
    recs = [json.loads(line) for line in open(path)]
    by = {}
    for r in recs:
        by.setdefault(r["arm"], {})[r["run_seed"]] = {k: m for k, m, _ in r["pass_at_k"]}
    n, problems = recs[0]["n"], recs[0]["problems"]
    ks = [k for k in KS if k < n] + [n]
    rows = [f"pass@k from n = {n} samples per problem at temperature 1 on the first {problems} held-out problems "
            f"(a 95% interval over problems of about ±{max(c for r in recs for _, _, c in r['pass_at_k']):.3f} at most, "
            "per run); the gaps are paired by seed.", "",
            "| arm | seeds | " + " | ".join(f"pass@{k}" for k in ks) + f" | pass@1 - warm | pass@{n} - warm | pass@{n} - GRPO "
            "| below the warm start from k |", "|" + "---|" * (len(ks) + 6)]
    for arm in ["warm", "grpo"] + [a for arms in RECIPES.values() for a in arms]:
        if arm not in by:
            continue
        seeds = by[arm]
        cells = [fmt([c[k] for c in seeds.values()]) for k in ks]

        def pgap(ref, k):
            common = sorted(set(seeds) & set(by.get(ref, {})))
            d = [seeds[s][k] - by[ref][s][k] for s in common]
            return "-" if not d or arm == ref else f"{mean_std(d)[0]:+.3f} ({sum(x > 0 for x in d)}/{len(d)})"
        mean = {k: sum(c[k] for c in seeds.values()) / len(seeds) for k in range(1, n + 1)}
        warm = {k: sum(c[k] for c in by["warm"].values()) / len(by["warm"]) for k in range(1, n + 1)} if "warm" in by else {}
        below = next((k for k in range(1, n + 1) if warm and mean[k] < warm[k]), None)
        rows.append(f"| {arm} | {len(seeds)} | " + " | ".join(cells) + f" | {pgap('warm', 1)} | {pgap('warm', n)} | "
                    f"{pgap('grpo', n)} | {'-' if arm == 'warm' else below or 'never'} |")
    return "\n".join(rows)


def views(run):
    """(steps, the teacher's view, the model's view) over a run's evaluations: the privileged
    view's accuracy of the weights distilled from, and of the weights being trained."""
    ev = run["eval"]
    return ([r["step"] for r in ev], [r["teacher_acc"] for r in ev],
            [r.get("current_teacher_acc", r["teacher_acc"]) for r in ev])


def view_figure(results, fp, out):
    """Per task, the teacher's view and the model's view over RL for every arm that distils (and
    the model's view under GRPO): mean over seeds, min to max as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = [t for t in TASKS if os.path.exists(os.path.join(results, f"{study.tag(t, fp)}.jsonl"))]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(13, 4.2 * len(tasks)), squeeze=False)
    colors = dict(zip([a for arms in RECIPES.values() for a in arms[:3]] + ["grpo"],
                      plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for row, task in zip(axes, tasks):
        runs = load(os.path.join(results, f"{study.tag(task, fp)}.jsonl"))
        for arm, color in colors.items():
            if arm not in runs:
                continue
            curves = [views(run) for run in runs[arm].values()]
            for ax, i, what in ((row[0], 1, "the teacher's view (weights distilled from)"),
                                (row[1], 2, "the model's view (weights trained, reading c)")):
                if arm != "grpo" or i == 2:
                    study.band(ax, curves[0][0], [c[i] for c in curves], color,
                               f"{arm} ({TEACHER.get(arm, 'none')})", f"{TASKS[task].split(',')[0]}: {what}")
        row[0].set_ylabel("held-out accuracy, greedy")
        row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def main(results, fp="default"):
    """teachers[_<fp>].md from each task's collected runs, <task>[_<fp>].jsonl, and its pass@k,
    passk[_<fp>].jsonl (the default task) or passk_derivation[_<fp>].jsonl (the chain task)."""
    md = []
    for task, what in TASKS.items():
        path = os.path.join(results, f"{study.tag(task, fp)}.jsonl")
        if not os.path.exists(path):
            continue
        runs = load(path)
        md += [f"### The teacher's weights ({what}; {fp} configuration)", "", accuracy_table(runs), ""]
        if sum(arm in runs for arm in EMA_RATES) > 1:
            md += [f"### The EMA teacher's rate ({task} task, release recipe)", "", rate_table(runs), ""]
        pk = passk_path(results, task, fp)
        if os.path.exists(pk):
            md += [f"### pass@k at the end of RL ({task.replace('derivation', 'chain')} task)", "", passk_table(pk), ""]
    path = os.path.join(results, "teachers" + ("" if fp == "default" else f"_{fp}") + ".md")
    with open(path, "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    try:
        print("figure:", view_figure(results, fp, path[:-len(".md")] + "_views.png"))
    except ImportError:
        print("no figure: matplotlib is not installed (pip install matplotlib)")
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="the teacher study's tables; --chain runs its chain task")
    p.add_argument("results", nargs="?", default=os.path.join(study.ROOT, "results", "teachers"))
    p.add_argument("--fp", default="default", choices=list(study.FLOAT_CONFIGS))
    p.add_argument("--chain", action="store_true", help="run the chain task's arms first (hours on 2 cores)")
    p.add_argument("--seeds", nargs="+", type=int, default=chain.SEEDS["derivation"])
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    if args.chain:
        run_chain(args.seeds, args.fp, args.results, args.jobs)
    main(args.results, args.fp)
