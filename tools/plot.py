"""
Draw the curves of one or more sdpg.py logs to a PNG (needs matplotlib, which sdpg.py itself does not).

    python tools/plot.py out/log.jsonl                          # writes out/log.png
    python tools/plot.py out_a/log.jsonl out_b/log.jsonl --out compare.png
    python tools/plot.py out/log.jsonl --estimators --out estimators.png   # k1, k2, k3 vs the exact KL
    python tools/plot.py out/log.jsonl --summary      # the tables of results/README.md, as markdown

Panels: held-out accuracy of the student and of the teacher view, rollout reward, exact KL to
the teacher, entropy, KL to the reference, and response length, all against the RL step.
"""
import argparse
import json
import os
import sys

PANELS = [("eval", "eval_acc", "student accuracy (held-out, greedy)"),
          ("eval", "teacher_acc", "teacher-view accuracy (held-out)"),
          ("rl", "reward", "rollout reward"),
          ("rl", "kl_teacher", "KL(student || teacher), nats/token"),
          ("rl", "entropy", "student entropy, nats/token"),
          ("rl", "kl_ref_k3", "KL(policy || reference), k3"),
          ("rl", "resp_len", "response length, tokens"),
          ("rl", "loss_out", "outcome loss")]


def read_log(path):
    """The records of a log.jsonl; ValueError with one line if it is not one."""
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable log.jsonl ({type(e).__name__})") from None
    if not records or records[0].get("phase") != "config":
        raise ValueError(f"{path}: not an sdpg.py log (no config record first)")
    return records


def plot(paths, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    for path in paths:
        records = read_log(path)
        cfg = records[0]
        label = f"{path} ({cfg['algo']}, seed {cfg['seed']})"
        for ax, (phase, key, title) in zip(axes.flat, PANELS):
            pts = [(r["step"], r[key]) for r in records if r.get("phase") == phase and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if phase == "eval" else None, ms=3, lw=1.2, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_estimators(path, out):
    """Sampled-token KL estimators k1, k2, k3 against the exact full-vocabulary KL, at the
    diagnostic steps of one log: mean over response tokens (lines) and their spread (one std, bands)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    diag = [r for r in read_log(path) if r.get("phase") == "rl" and "exact_ref" in r]
    if not diag:
        raise ValueError(f"{path}: no diagnostic records (run tools/extras.py with --diag_every > 0)")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, pair, title in zip(axes, ("teacher", "ref"), ("student vs privileged teacher", "policy vs reference")):
        for est, style in (("exact", "k-"), ("k1", "C0--"), ("k2", "C1-."), ("k3", "C2:")):
            pts = [(r["step"], r[f"{est}_{pair}"], r[f"{est}_{pair}_std"]) for r in diag if f"{est}_{pair}" in r]
            if not pts:
                continue
            x, m, sd = zip(*pts)
            ax.plot(x, m, style, lw=1.5, label=f"{est} mean")
            if est != "exact":
                ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.12)
        ax.set_title(f"KL({title}), nats/token", fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def summary(path):
    """Markdown tables of one log: the evaluations; the first and last ten RL steps; at the
    diagnostic steps, the KL estimators against the exact KL and the per-term gradient norms;
    the median step time with and without diagnostics."""
    records = read_log(path)
    evals = [r for r in records if r.get("phase") == "eval"]
    rl = [r for r in records if r.get("phase") == "rl"]
    diag = [r for r in rl if "exact_ref" in r]
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")
    n = next((k[5:] for k in evals[0] if k.startswith("mean@") and not k.endswith("ci95")), None) if evals else None
    rows = [("`eval_acc` (student, greedy)", "eval_acc"), ("`teacher_acc` (privileged view, greedy)", "teacher_acc")]
    if n:
        rows[1:1] = [(f"`mean@{n}` (student, temperature 1)", f"mean@{n}"), (f"95% interval of `mean@{n}`", f"mean@{n}_ci95")]
    out = ["| RL step | " + " | ".join(str(r["step"]) for r in evals) + " |", "|---" * (len(evals) + 1) + "|"]
    out += [f"| {name} | " + " | ".join(f"{r[k]:.3f}" for r in evals) + " |" for name, k in rows]
    out += ["", "| metric | first 10 steps | last 10 steps |", "|---|---|---|"]
    for k in ("reward", "kl_teacher", "entropy", "kl_ref_k3", "beta_k"):
        if rl and k in rl[0]:
            first, last = [r[k] for r in rl[:10]], [r[k] for r in rl[-10:]]
            out.append(f"| `{k}` | {sum(first) / len(first):.3g} | {sum(last) / len(last):.3g} |")
    if diag:
        out += ["", f"KL estimators at the {len(diag)} diagnostic steps (mean over steps of the per-step token mean; "
                "spread: mean of the per-token std):", "", "| pair | exact | k1 | k2 | k3 |", "|---|---|---|---|---|"]
        for pair, name in (("teacher", "student vs teacher"), ("ref", "policy vs reference")):
            if f"exact_{pair}" in diag[0]:
                for stat, suffix in (("mean", ""), ("spread", "_std")):
                    vals = [sum(r[f"{e}_{pair}{suffix}"] for r in diag) / len(diag) for e in ("exact", "k1", "k2", "k3")]
                    out.append(f"| {name}: {stat} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
        out += ["", "| gradient norm | min | median | max |", "|---|---|---|---|"]
        for k in ("grad_norm_out", "grad_norm_opd", "grad_norm_ref", "grad_cos_out_opd"):
            vals = [r[k] for r in diag if k in r]
            if vals:
                out.append(f"| `{k}` | {min(vals):.3g} | {median(vals):.3g} | {max(vals):.3g} |")
    plain = [r["dt"] for r in rl if "exact_ref" not in r]
    out += ["", f"median RL step {median(plain):.3f} s" + (f", {median([r['dt'] for r in diag]):.3f} s at the "
            f"{len(diag)} diagnostic steps" if diag else "") + f"; {len(rl)} RL steps"]
    return "\n".join(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="plot sdpg.py logs")
    p.add_argument("logs", nargs="+", help="log.jsonl files")
    p.add_argument("--out", default="", help="PNG to write (default: beside the first log)")
    p.add_argument("--estimators", action="store_true", help="draw the KL estimators of the first log instead")
    p.add_argument("--summary", action="store_true", help="print markdown tables of the first log (no matplotlib needed)")
    args = p.parse_args()
    if args.summary:
        try:
            print(summary(args.logs[0]))
        except ValueError as e:
            sys.exit(f"plot.py: error: {e}")
        sys.exit(0)
    out = args.out or os.path.splitext(args.logs[0])[0] + ".png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("plot.py: error: matplotlib is not installed (pip install matplotlib); sdpg.py does not need it")
    try:
        print(plot_estimators(args.logs[0], out) if args.estimators else plot(args.logs, out))
    except ValueError as e:
        sys.exit(f"plot.py: error: {e}")
