"""
What exactness buys, in gradient: each approximation of the distillation term (tools/approx.py)
beside the exact one, on the same tokens, at every RL step of real runs.

    python tools/exactness.py run [--seeds 0 1 2] [--jobs 2]  # the runs: out/exactness/<task>/s<S>
    python tools/exactness.py table                         # results/approx/gradients.{md,png}

A run is tools/extras.py --approx_every 1 under the release recipe (ungated, so every rollout's
tokens are distilled): the default task (200 RL steps, the study's settings) and the chain task
with the derivation as context (100 steps, tools/chain.py's). At each step the hook takes the
step's first mini-batch before its update, runs the student forward again with gradients on the
unwrapped model, and for the exact KL and each approximation forms the distillation term as the
loss does (its token-mean over the mini-batch's response tokens; the release recipe's KL cap of
20, which no token here reaches, left out) and its gradient with respect to every weight
(torch.autograd.grad: nothing is written to .grad, no training stream is drawn from). Logged,
for each approximation a:

    cos_a     cosine of its gradient with the exact gradient
    norm_a    |grad_a| / |grad_exact|
    bias_a    mean over tokens of its value less the exact KL (the sampled token's value: k1,
              log p(y) - log q(y), the estimate of the KL it carries)
    mass_k    the student's probability mass outside its own top k (mass_teacher_k: outside
              the teacher's top k), mean over tokens
    var_sampled    E |g_draw - g_exact|^2 / |g_exact|^2 over 8 fresh draws y ~ p at every position
                   (its own generator), the sampled token's variance around the exact gradient;
                   cos_sampled_draw their mean cosine

a in student_k (top-k on the student's support, renormalised), tail_k (with a tail bucket),
teacher_k (top-k on the teacher's support, renormalised), k = 1, 2, 4, 8, 16, and sampled (the
rollout's own token).
"""
import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import sdpg  # noqa: E402
import approx  # noqa: E402
from model import head_logits, response_hidden  # noqa: E402

KS = (1, 2, 4, 8, 16)
DRAWS = 8  # fresh token draws per position for the sampled token's variance
RUNS = {  # the release recipe; the default task as tools/study.py runs it, the chain task as chain.py
    "default": ["--recipe", "release", "--rl_steps", "200", "--eval_every", "20", "--eval_samples", "0"],
    "chain": ["--task", "chain", "--context", "derivation", "--sft_until", "0.3", "--eval_size", "500",
              "--recipe", "release", "--rl_steps", "100", "--prompts_per_step", "16", "--eval_every", "20",
              "--eval_samples", "0"],
}


def flat_grad(term, params, world_size):
    """The gradient of term with respect to params, one flat vector, averaged over ranks as DDP
    does; .grad is not touched."""
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    return sdpg.all_sum(flat) / world_size


def cosine(g, g_exact):  # 0 for a zero gradient (top-1 renormalised: one entry, no KL to move)
    if g.norm() == 0 or g_exact.norm() == 0:
        return 0.0
    return (g @ g_exact / (g.norm() * g_exact.norm())).item()


def approx_gradients(run, k, mb):
    """The fields above for mini-batch mb at RL step k (a hook's; changes nothing)."""
    model, tau = run.model, run.args.temperature
    params = [p for p in model.parameters() if p.requires_grad]
    mask = mb.mask.flatten() > 0
    n_tokens = sdpg.all_sum(mb.mask.sum()).item()  # the global mini-batch's, as update() counts
    with torch.autocast(params[0].device.type, enabled=False):
        with run.ctx:
            h = response_hidden(model, mb.x, mb.resp, mb.x_pad).flatten(0, 1)[mask]  # (N, H)
        zs = head_logits(h, model.lm_head_weight)  # (N, V), the student's logits, with gradient
        zt = head_logits(mb.h_teacher.flatten(0, 1)[mask], mb.w_teacher).detach()  # the teacher's
        tokens = mb.resp.flatten()[mask]  # (N,) the rollouts' own tokens
        exact = approx.exact_reverse_kl(zs, zt, tau)  # (N,)
        g_exact = flat_grad(exact.sum() / n_tokens, params, run.world_size)
        out = {"kl_exact": sdpg.all_sum(exact.detach().sum()).item() / n_tokens}

        def compare(name, value, kl_value=None):  # kl_value: the KL estimate value carries
            kl_value = value if kl_value is None else kl_value
            g = flat_grad(value.sum() / n_tokens, params, run.world_size)
            out[f"cos_{name}"] = cosine(g, g_exact)
            out[f"norm_{name}"] = (g.norm() / g_exact.norm()).item()
            bias = sdpg.all_sum((kl_value - exact).detach().sum()).item() / n_tokens
            out[f"bias_{name}"] = bias
            return g

        for kk in KS:
            compare(f"student_{kk}", approx.topk_student_renorm(zs, zt, kk, tau))
            compare(f"tail_{kk}", approx.topk_student_tail(zs, zt, kk, tau))
            compare(f"teacher_{kk}", approx.topk_teacher_renorm(zs, zt, kk, tau))
            with torch.no_grad():
                for side, support in (("mass", None), ("mass_teacher", zt)):
                    left = approx.topk_left_out_mass(zs, kk, tau, support_logits=support)
                    out[f"{side}_{kk}"] = sdpg.all_sum(left.sum()).item() / n_tokens
        logp = torch.log_softmax(zs.detach() / tau, -1)
        logq = torch.log_softmax(zt / tau, -1)

        def k1(y):  # log p(y) - log q(y) at each position, the sampled token's KL estimate
            return (logp.gather(-1, y[:, None]) - logq.gather(-1, y[:, None]))[:, 0]

        compare("sampled", approx.sampled_token(zs, zt, tokens, tau), k1(tokens))
        gen = torch.Generator(device=zs.device).manual_seed(run.args.seed * 100003 + k)
        squared, cosines = 0.0, 0.0
        for _ in range(DRAWS):  # fresh y ~ p at every position: the estimate's spread
            y = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
            g = flat_grad(approx.sampled_token(zs, zt, y, tau).sum() / n_tokens, params, run.world_size)
            squared += ((g - g_exact).norm() ** 2 / g_exact.norm() ** 2).item() / DRAWS
            cosines += cosine(g, g_exact) / DRAWS
        out["var_sampled"], out["cos_sampled_draw"] = squared, cosines
    return out


def finished(out):  # the run's log holds its last step's evaluation
    try:
        with open(os.path.join(out, "log.jsonl")) as f:
            records = [json.loads(line) for line in f]
    except (OSError, json.JSONDecodeError):
        return False
    return any(r["phase"] == "eval" and r["step"] == records[0]["rl_steps"] for r in records[1:])


def run_all(seeds, jobs):
    """Every (task, seed) run, jobs at a time, each one thread; a finished run is kept."""
    pending = []
    for task, flags in RUNS.items():
        for seed in seeds:
            out = os.path.join(ROOT, "out", "exactness", task, f"s{seed}")
            if finished(out):
                continue
            cmd = [sys.executable, os.path.join(HERE, "extras.py"), *flags, "--approx_every", "1",
                   "--seed", str(seed), "--out_dir", out]
            pending.append((out, cmd))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running = []
    while pending or running:
        while pending and len(running) < jobs:
            out, cmd = pending.pop(0)
            os.makedirs(out, exist_ok=True)
            print(" ".join(cmd[1:]), flush=True)
            running.append((out, subprocess.Popen(cmd, env=env, stdout=open(os.path.join(out, "stdout.txt"), "w"),
                                                  stderr=subprocess.STDOUT)))
        out, proc = running.pop(0)
        if proc.wait() != 0:
            print(f"exactness.py: {out} failed: see {out}/stdout.txt", file=sys.stderr)


def read_runs(root):
    """{task: {seed: [rl records]}} from out/exactness."""
    runs = {}
    for task in RUNS:
        for name in sorted(os.listdir(os.path.join(root, task))) if os.path.isdir(os.path.join(root, task)) else []:
            path = os.path.join(root, task, name, "log.jsonl")
            if finished(os.path.join(root, task, name)):  # a run still going is left out
                with open(path) as f:
                    records = [json.loads(line) for line in f]
                rl = [r for r in records if r["phase"] == "rl" and "cos_sampled" in r]
                if rl:
                    runs.setdefault(task, {})[int(name[1:])] = rl
    return runs


def summary(runs):
    """Per task and field: the mean over a run's steps, then the mean and the range over seeds."""
    table = {}
    for task, by_seed in runs.items():
        names = [k for k in by_seed[min(by_seed)][0] if k.split("_")[0] in ("cos", "norm", "bias", "mass", "var", "kl")]
        table[task] = {}
        for name in names:
            per_seed = [float(np.mean([r[name] for r in rl])) for rl in by_seed.values()]
            table[task][name] = (float(np.mean(per_seed)), min(per_seed), max(per_seed), len(per_seed))
    return table


def write_table(runs, path):
    table = summary(runs)
    lines = ["# What exactness buys: the gradient", "",
             "`python tools/exactness.py run` then `python tools/exactness.py table`. Release recipe; at every RL",
             "step, the step's first mini-batch before its update; each figure the mean over a run's steps,",
             "then the mean over seeds [lowest, highest seed]. cos: cosine of the approximation's gradient",
             "(with respect to every weight) with the exact one; norm: its norm over the exact one's; bias:",
             "its value less the exact KL, per token; mass: the student's probability outside the top k.", ""]
    for task in table:
        n = next(iter(table[task].values()))[3]
        t = table[task]
        lines += [f"## {task} task, {n} seeds (exact KL per token {t['kl_exact'][0]:.3f})", "",
                  "| k | student top-k: cos | norm | bias | tail: cos | norm | bias | teacher top-k: cos | norm | bias "
                  "| mass left out, student's top k | teacher's top k |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def cell(name, fmt="{:.3f}"):
            mean, lo, hi, _ = t[name]
            return f"{fmt.format(mean)} [{fmt.format(lo)}, {fmt.format(hi)}]"
        for kk in KS:
            row = [str(kk)]
            for kind in ("student", "tail", "teacher"):
                row += [cell(f"cos_{kind}_{kk}"), cell(f"norm_{kind}_{kk}"), cell(f"bias_{kind}_{kk}", "{:+.3f}")]
            row += [cell(f"mass_{kk}", "{:.4f}"), cell(f"mass_teacher_{kk}", "{:.4f}")]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"Sampled token (the rollout's own): cos {cell('cos_sampled')}, norm {cell('norm_sampled')}, "
                  f"bias of its k1 value {cell('bias_sampled', '{:+.3f}')}; over {DRAWS} fresh draws per position "
                  f"E|g - g_exact|^2 / |g_exact|^2 {cell('var_sampled', '{:.2f}')}, mean cosine "
                  f"{cell('cos_sampled_draw')}.", ""]
        first = {kk: float(np.mean([rl[0][f"mass_{kk}"] for rl in runs[task].values()])) for kk in KS}
        lines.append("- at the first step (the warm start's distribution), the student's mass "
                     "outside its top k: " + ", ".join(f"k = {kk} {first[kk]:.4f}" for kk in KS))
        for kind, what in (("student", "the student's top k"), ("tail", "with the tail"),
                           ("teacher", "the teacher's top k")):
            passing = [kk for kk in KS if t[f"cos_{kind}_{kk}"][0] > 0.9]
            lines.append(f"- the smallest k whose mean cosine passes 0.9, {what}: "
                         f"{passing[0] if passing else 'none of ' + str(KS)}")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return "\n".join(lines)


def smoothed(values, width=10):  # the running mean over the last width steps
    values = np.asarray(values, dtype=float)
    out = np.empty_like(values)
    for i in range(len(values)):
        out[i] = values[max(0, i - width + 1):i + 1].mean()
    return out


def figure(runs, path):
    """Per task, the seeds' mean cosine with the exact gradient over the run (a running mean of
    10 steps) for each support and k, and the sampled token's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = (("student", "the student's top k"), ("tail", "the student's top k + tail"),
             ("teacher", "the teacher's top k"))
    fig, axes = plt.subplots(len(runs), 3, figsize=(15, 3.6 * len(runs)), squeeze=False)
    for row, (task, by_seed) in enumerate(runs.items()):
        n = min(len(rl) for rl in by_seed.values())
        steps = [r["step"] for r in by_seed[min(by_seed)][:n]]
        for col, (kind, title) in enumerate(kinds):
            ax = axes[row][col]
            for kk, color in zip(KS, plt.cm.viridis(np.linspace(0, 0.9, len(KS)))):
                mean = np.mean([[r[f"cos_{kind}_{kk}"] for r in rl[:n]] for rl in by_seed.values()], 0)
                ax.plot(steps, smoothed(mean), color=color, label=f"k = {kk}")
            mean = np.mean([[r["cos_sampled"] for r in rl[:n]] for rl in by_seed.values()], 0)
            ax.plot(steps, smoothed(mean), color="tab:red", linestyle="--", label="sampled token")
            ax.set_title(f"{task} task ({len(by_seed)} seeds): {title}", fontsize=10)
            ax.set_xlabel("RL step")
            ax.set_ylabel("cosine with the exact gradient")
            ax.set_ylim(-0.05, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description="What exactness buys: the gradient study")
    p.add_argument("what", choices=["run", "table"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--runs", default=os.path.join(ROOT, "out", "exactness"))
    p.add_argument("--results", default=os.path.join(ROOT, "results", "approx"))
    args = p.parse_args(argv)
    if args.what == "run":
        run_all(args.seeds, args.jobs)
        return
    runs = read_runs(args.runs)
    if not runs:
        sys.exit(f"exactness.py: no runs under {args.runs}: python tools/exactness.py run")
    os.makedirs(args.results, exist_ok=True)
    print(write_table(runs, os.path.join(args.results, "gradients.md")))
    try:
        figure(runs, os.path.join(args.results, "gradients.png"))
    except ImportError:
        print("exactness.py: no figure without matplotlib")


if __name__ == "__main__":
    main()
