"""
A task where a derivation comes before the answer: the running sum mod 10 of a chain of digits,
each step written out, one reward at the end for the last value. A right answer can hide a wrong
derivation (two slips that cancel), which addition's unique three-token sums cannot.

    problem   the digits 3, 7, 5, 2 (a chain of 3 to 5 digits: prompts of different lengths)
    prompt  x = "3752="
    response  "33705527>7" <|endoftext|>    each step two tokens: the digit d_k, copied from the
                                            prompt, then the running sum s_k = (s_(k-1) + d_k)
                                            mod 10; after ">" the answer s_n
    contexts c  answer      "7"             the final answer alone, as the paper's teacher
                derivation  "33705527>7"    the whole reference response (OPSD-, SDFT-style)

Writing d_k before s_k keeps each sum local (two tokens back and one), so the default model
learns the chain in a warm start of minutes; written as sums alone, it had not after 1,250 steps.
Chains of up to 6 digits were too slow to learn: one warm-start seed of three ended 2,000 steps at
chance, another had not reached the bar at 1,200. Up to 5, the answer context's warm start reached
the bar in all 6 tried, in 670 to 789 steps; the derivation context's in 10 of 12, in 551 to 1,365
(plausibly because its teacher rows can copy the derivation: half of each batch practises less).

The verifier reads only what follows the last ">": 1.0 if it is the answer digit. Responses are
8 to 12 tokens and the end-of-text; prompts 4 to 6 (sdpg.py pads them on the left). Runs through
tools/extras.py (which is sdpg.py with a task and a hook):

    python tools/extras.py --task chain --context derivation [sdpg.py flags]

With the chain task, extras.py logs with every RL step, from its first mini-batch (all ranks):
    deriv_acc     the share of rollouts whose every step is right
    won_frac      the share of rollouts rewarded (their answer right)
    lucky_frac    the share of rollouts rewarded with a wrong derivation ("lucky"); over any
                  window of steps, sum lucky_frac / sum won_frac is the lucky share
    kl_deriv_pos, kl_ans_pos, kl_deriv_neg, kl_ans_neg
                  the KL to the teacher per token, on derivation and answer tokens (the ">", the
                  digit, the end-of-text), of rewarded (pos) and unrewarded (neg) rollouts
and every --eval_every steps, at the weights before the step (so step k reports step k - 1),
greedy on the held-out set: greedy_acc, greedy_deriv_acc and greedy_lucky_share; the same for
the final weights in a last record {"phase": "chain", "step": T} once training is done.

The study (the official GRPO, the paper and release recipes, each with beta 0, for each context,
every arm of a seed from the warm start of its context and seed; tools/study.py's runner; a seed
whose warm start ends short of its bar is left out, with a line):

    python tools/chain.py --quick            # 5 arms x 2 contexts x seed 0 (19 min, 2 cores)
    python tools/chain.py                    # 5 arms x seeds 0-2 (answer), 0-2, 5, 6 (derivation)
    python tools/chain.py --fp compatible    # the same under a second floating-point setting
    python tools/chain.py --report           # tables and figure again from results/chain/

Runs go to out/chain[_<fp>]/<context>/<arm>_s<seed>/, the fields used to
results/chain/<context>[_<fp>].jsonl, the tables to results/chain/chain[_<fp>].md.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sdpg  # noqa: E402
import study  # noqa: E402  (tools/study.py: the runner, collection and statistics)
from study import fmt  # noqa: E402
from data import decode_response, encode_chars  # noqa: E402
from model import fused_reverse_kl, response_hidden  # noqa: E402

CHAIN_LENGTHS = (3, 5)  # digits per chain, both ends included
CHAIN_CONTEXTS = ("answer", "derivation")
CHAIN_SEED = 1234  # the held-out chains are the same for every run


def steps_text(digits):
    """The reference derivation, a digit and the running sum per step: 3, 7, 5, 2 -> '33705527'."""
    s, out = 0, []
    for d in digits:
        s = (s + d) % 10
        out.append(f"{d}{s}")
    return "".join(out)


def final_answer(text):
    """What follows the last '>' of a response, '' if none: the only part the verifier reads."""
    return text.rsplit(">", 1)[1] if ">" in text else ""


class ChainTask:
    """The running sum mod 10, written out step by step (module docstring); the task interface
    of data.AdditionTask: eval_set, sample, prompt, context, answer, reward."""

    def __init__(self, eval_size=1000, context="answer", lengths=CHAIN_LENGTHS):
        if context not in CHAIN_CONTEXTS:
            raise ValueError(f"--context must be one of {', '.join(CHAIN_CONTEXTS)} with --task "
                             f"chain (got {context!r})")
        if not 1 <= eval_size <= 10_000:
            raise ValueError(f"--eval_size must be in [1, 10000] with --task chain (got "
                             f"{eval_size})")
        self.kind, self.lengths = context, tuple(lengths)
        rng, held = np.random.default_rng(CHAIN_SEED), {}
        while len(held) < eval_size:  # distinct chains, lengths uniform
            p = self._draw(rng)
            held.setdefault(p, None)
        self.eval_set, self.held_out = list(held), set(held)
        if max(map(len, self.eval_set)) < self.lengths[1]:  # sdpg.py's block size comes from it
            raise ValueError(f"--eval_size {eval_size}: the held-out chains must include one of "
                             f"the longest length, {self.lengths[1]}")

    def __repr__(self):  # keys the warm-start cache
        return f"ChainTask(eval_size={len(self.eval_set)}, context={self.kind!r}, " \
               f"lengths={self.lengths})"

    def _draw(self, rng):
        n = int(rng.integers(self.lengths[0], self.lengths[1] + 1))
        return tuple(int(d) for d in rng.integers(0, 10, n))

    def sample(self, rng, n):  # n training chains, never a held-out one
        out = []
        while len(out) < n:
            p = self._draw(rng)
            if p not in self.held_out:
                out.append(p)
        return out

    def prompt(self, p):
        return "".join(map(str, p)) + "="

    def answer(self, p):
        return f"{steps_text(p)}>{sum(p) % 10}"

    def context(self, p, rng):
        return str(sum(p) % 10) if self.kind == "answer" else self.answer(p)

    def reward(self, text, p):
        return 1.0 if isinstance(text, str) and final_answer(text) == str(sum(p) % 10) else 0.0

    def derivation_right(self, text, p):
        """Every step of the response exactly the reference's: the text before its last '>'."""
        return isinstance(text, str) and ">" in text and text.rsplit(">", 1)[0] == steps_text(p)


def answer_tokens(resp, mask, marker):
    """(B, Tr) bool: the answer part of each response, from its last marker token ('>') on,
    end-of-text included; a response without the marker has no answer part."""
    is_marker = (resp == marker) & mask.bool()
    last = torch.where(is_marker, torch.arange(resp.size(1), device=resp.device), -1).amax(1)
    cols = torch.arange(resp.size(1), device=resp.device)[None]
    return (cols >= last[:, None]) & (last[:, None] >= 0) & mask.bool()


def chain_metrics(run, mb):
    """deriv_acc, won_frac, lucky_frac and the KL per token on derivation and answer tokens of
    rewarded and unrewarded rollouts, over the mini-batch mb of all ranks (module docstring)."""
    texts = [decode_response(run.enc, r) for r in mb.resp.tolist()]
    G = run.args.group_size
    right = torch.tensor([run.task.derivation_right(t, mb.problems[i // G])
                          for i, t in enumerate(texts)], device=mb.mask.device).double()
    won = (mb.rewards > 0).double()
    counts = [len(texts), right.sum(), won.sum(), (won * (1 - right)).sum()]
    if mb.h_teacher is not None:
        with torch.no_grad(), run.ctx:
            h = response_hidden(run.model, mb.x, mb.resp, mb.x_pad).flatten(0, 1)
            kl = fused_reverse_kl(h, mb.h_teacher.flatten(0, 1), run.model.lm_head_weight,
                                  run.args.temperature, teacher_weight=mb.w_teacher)
        kl, m = kl.view(mb.mask.shape).double(), mb.mask.double()
        ans = answer_tokens(mb.resp, mb.mask, run.enc.encode_single_token(">")).double()
        for part in (m - ans, ans):  # derivation tokens, answer tokens
            for rows in (won, 1 - won):
                w = part * rows[:, None]
                counts += [(kl * w).sum(), w.sum()]
    s = sdpg.all_sum(torch.tensor([float(c) for c in counts], dtype=torch.float64,
                                  device=mb.mask.device)).tolist()
    rec = {"deriv_acc": s[1] / s[0], "won_frac": s[2] / s[0], "lucky_frac": s[3] / s[0]}
    names = ("kl_deriv_pos", "kl_deriv_neg", "kl_ans_pos", "kl_ans_neg")
    for i, name in enumerate(names if len(s) > 4 else ()):
        rec[name] = s[4 + 2 * i] / max(s[5 + 2 * i], 1)
    return rec


@torch.no_grad()
def greedy_metrics(run, shard=True):
    """Greedy on the held-out set, the student view: greedy_acc, greedy_deriv_acc and
    greedy_lucky_share (the share of right answers whose derivation is wrong), sharded over the
    ranks (every rank calls it), or with shard False the whole set on this process."""
    problems = run.task.eval_set
    mine = problems[run.rank::run.world_size] if shard else problems
    counts = torch.zeros(3, dtype=torch.float64, device=run.device)  # right, derived, lucky
    if mine:
        resp, _ = sdpg.generate_padded(run, run.model,
                                       [encode_chars(run.enc, run.task.prompt(p)) for p in mine])
        for r, p in zip(resp.tolist(), mine):
            t = decode_response(run.enc, r)
            won, right = run.task.reward(t, p) > 0, run.task.derivation_right(t, p)
            counts += torch.tensor([won, right, won and not right], dtype=torch.float64,
                                   device=run.device)
    won, right, lucky = (sdpg.all_sum(counts) if shard else counts).tolist()
    n = len(problems)
    return {"greedy_acc": won / n, "greedy_deriv_acc": right / n,
            "greedy_lucky_share": lucky / max(won, 1)}


def make_where(eval_every):
    """where(run, k, mb) for extras.make_hook: chain_metrics every step, greedy_metrics at step 1
    and every eval_every steps after it (the weights before the step)."""
    def where(run, k, mb):
        rec = chain_metrics(run, mb)
        if k == 1 or (eval_every and (k - 1) % eval_every == 0):
            rec.update(greedy_metrics(run))
        return rec
    return where


# -----------------------------------------------------------------------------
# the study

# the warm start of each context (the student at 30%: chance is 10%, and the check every step
# begins at half the bar), and the RL flags of every run: shorter than addition's study, as a
# chain step costs about three addition steps
STUDY = {c: (["--task", "chain", "--context", c, "--sft_until", "0.3", "--eval_size", "500"], None)
         for c in CHAIN_CONTEXTS}
# the seeds of each context: the derivation's warm starts of seeds 3 and 4 ended short of the
# bar (seed 4 at 2,000 steps, 0.166; seed 3 was stopped at 1,250), so its 5 are 0-2, 5 and 6
SEEDS = {"answer": [0, 1, 2], "derivation": [0, 1, 2, 5, 6]}
RL = ["--rl_steps", "100", "--prompts_per_step", "16", "--eval_every", "20", "--eval_samples", "0"]
ARMS = ["grpo", "paper_urkl", "paper_beta0", "release", "release_beta0"]  # study.py's arms
GAPS = [("paper_urkl", "paper_beta0"), ("release", "release_beta0"), ("paper_urkl", "grpo"),
        ("release", "grpo"), ("paper_urkl", "release")]
KL = ("kl_deriv_pos", "kl_ans_pos", "kl_deriv_neg", "kl_ans_neg")


def collect(context, out_root, results, fp="default"):
    """Every finished run of a context into results/<context>[_<fp>].jsonl, one line per run:
    {arm, seed, eval: [{step, eval_acc, teacher_acc}], rl: [{step, reward, deriv_acc,
    won_frac, lucky_frac, kl_*}], greedy: [{step, greedy_*}] (step: the weights evaluated),
    warm: where its warm start landed}."""
    path = os.path.join(results, f"{study.tag(context, fp)}.jsonl")
    root = os.path.join(out_root, context)
    with open(path, "w") as out:
        for arm in ARMS:
            for d in sorted(x for x in os.listdir(root) if x.startswith(arm + "_s") and
                            x[len(arm) + 2:].isdigit()):
                seed, records = int(d[len(arm) + 2:]), None
                if study.complete(os.path.join(root, d)):
                    records = study.read_log(os.path.join(root, d))
                if not records or records[-1]["phase"] != "chain":
                    continue
                warm = study.read_log(os.path.join(root, f"warm_s{seed}"))
                sft = [r for r in warm if r["phase"] == "sft" and "val_acc" in r]
                pick = lambda r, keys: {k: round(r[k], 5) if k != "step" else r[k]  # noqa: E731
                                        for k in keys if k in r}
                greedy = [dict(pick(r, ("greedy_acc", "greedy_deriv_acc", "greedy_lucky_share")),
                               step=r["step"] - 1) for r in records if "greedy_acc" in r]
                final = records[-1]
                greedy.append(pick(final, ("step", "greedy_acc", "greedy_deriv_acc",
                                           "greedy_lucky_share")))
                out.write(json.dumps({
                    "arm": arm, "seed": seed,
                    "eval": [pick(r, ("step", "eval_acc", "teacher_acc")) for r in records
                             if r["phase"] == "eval"],
                    "rl": [pick(r, ("step", "reward", "deriv_acc", "won_frac", "lucky_frac", *KL))
                           for r in records if r["phase"] == "rl"],
                    "greedy": greedy,
                    "warm": {"sft_steps": max(r["step"] for r in warm if r["phase"] == "sft" and
                                              "step" in r),
                             "val_acc": round(sft[-1]["val_acc"], 5) if sft else None,
                             "reached": study.short_of_bar(warm) is None}}) + "\n")
    return path


def load(path):  # {arm: {seed: run}} from a collected file
    runs = {}
    with open(path) as f:
        for run in map(json.loads, f):
            runs.setdefault(run["arm"], {})[run["seed"]] = run
    return runs


def lucky(rl, first):  # the lucky share of rewarded rollouts over the first or last 10 steps
    rows = rl[:10] if first else rl[-10:]
    won = sum(r["won_frac"] for r in rows)
    return sum(r["lucky_frac"] for r in rows) / won if won else float("nan")


def tables(runs, context):
    """Markdown: per arm the final held-out answer and derivation accuracy (greedy), the lucky
    share of right greedy answers at the start and the end, that of rewarded rollouts over the
    first and last 10 steps, the KL per token by part and rollout kind (mean over steps), the
    teacher view's final accuracy; then the paired gaps of the comparisons in GAPS."""
    lines = [f"### Context: {context}", "",
             "| arm | seeds | answer acc: start -> final | derivation acc: start -> final | "
             "lucky share of right answers: start -> final | lucky share of rewarded rollouts: "
             "steps 1-10 -> last 10 | KL/token deriv, answer (rewarded) | KL/token deriv, answer "
             "(unrewarded) | teacher acc, final |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        seeds = runs.get(arm, {})
        if not seeds:
            continue
        g = lambda i, k: [s["greedy"][i][k] for s in seeds.values()]  # noqa: E731
        rl = [s["rl"] for s in seeds.values()]
        kl = {k: [sum(r[k] for r in x) / len(x) for x in rl if all(k in r for r in x)] for k in KL}
        pair = lambda a, b: f"{fmt(kl[a])}, {fmt(kl[b])}" if kl[a] else "-"  # noqa: E731
        lines.append(
            f"| {arm} | {len(seeds)} | {fmt(g(0, 'greedy_acc'))} -> {fmt(g(-1, 'greedy_acc'))} | "
            f"{fmt(g(0, 'greedy_deriv_acc'))} -> {fmt(g(-1, 'greedy_deriv_acc'))} | "
            f"{fmt(g(0, 'greedy_lucky_share'))} -> {fmt(g(-1, 'greedy_lucky_share'))} | "
            f"{fmt([lucky(x, True) for x in rl])} -> {fmt([lucky(x, False) for x in rl])} | "
            f"{pair('kl_deriv_pos', 'kl_ans_pos')} | {pair('kl_deriv_neg', 'kl_ans_neg')} | "
            f"{fmt([s['eval'][-1]['teacher_acc'] for s in seeds.values()])} |")
    lines += ["", "| paired gap, same seed | seeds | answer acc, final | derivation acc, final | "
              "lucky share of rewarded rollouts, last 10 steps | ahead on answer acc |",
              "|---|---|---|---|---|---|"]
    for a, b in GAPS:
        shared = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
        if not shared:
            continue
        d = {k: [runs[a][s]["greedy"][-1][k] - runs[b][s]["greedy"][-1][k] for s in shared]
             for k in ("greedy_acc", "greedy_deriv_acc")}
        dl = [lucky(runs[a][s]["rl"], False) - lucky(runs[b][s]["rl"], False) for s in shared]
        ahead = sum(x > 0 for x in d["greedy_acc"])
        lines.append(f"| {a} - {b} | {len(shared)} | {fmt(d['greedy_acc'])} | "
                     f"{fmt(d['greedy_deriv_acc'])} | {fmt(dl)} | {ahead}/{len(shared)} |")
    warm = ", ".join(f"seed {s} {r['warm']['sft_steps']} steps, val acc {r['warm']['val_acc']}"
                     + ("" if r["warm"].get("reached", True) else " (short of its bar)")
                     for s, r in sorted(next(iter(runs.values())).items()))
    lines += ["", "mean ± std over seeds (gaps: of the per-seed differences); greedy on the 500 "
              f"held-out chains; start: the warm start, RL step 0. Warm starts: {warm}.", ""]
    return "\n".join(lines)


def figure(all_runs, out):
    """Per context: held-out answer and derivation accuracy (greedy), and the lucky share of
    rewarded rollouts (10-step mean); mean over seeds, min to max as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("greedy", "greedy_acc", "answer accuracy (held-out, greedy)"),
              ("greedy", "greedy_deriv_acc", "derivation accuracy (held-out, greedy)"),
              ("rl", "lucky", "lucky share of rewarded rollouts (10-step window)")]
    fig, axes = plt.subplots(len(all_runs), 3, figsize=(16, 4.2 * len(all_runs)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (context, runs) in zip(axes, all_runs.items()):
        for (arm, seeds), color in zip(((a, runs[a]) for a in ARMS if a in runs), colors):
            for ax, (part, key, title) in zip(row, panels):
                if part == "rl":  # sum lucky / sum won over a trailing 10-step window
                    curves = [[x / w if w else float("nan") for x, w in zip(
                        study.smooth([r["lucky_frac"] for r in s["rl"]]),
                        study.smooth([r["won_frac"] for r in s["rl"]]))] for s in seeds.values()]
                else:
                    curves = [[r[key] for r in s[part]] for s in seeds.values()]
                steps = [r["step"] for r in next(iter(seeds.values()))[part]]
                study.band(ax, steps, curves, color, arm, f"context {context}: {title}")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def main():
    p = argparse.ArgumentParser(description="the chain study: GRPO and SDPG on a derivation task")
    p.add_argument("--quick", action="store_true", help="seed 0 only")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: SEEDS")
    p.add_argument("--contexts", nargs="+", default=list(CHAIN_CONTEXTS), choices=CHAIN_CONTEXTS)
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument("--fp", default="default", choices=list(study.FLOAT_CONFIGS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only the tables and figure again")
    p.add_argument("--results", default=os.path.join(study.ROOT, "results", "chain"))
    args = p.parse_args()
    seeds = {c: [0] if args.quick else args.seeds or SEEDS[c] for c in args.contexts}
    out_root = os.path.join("out", "chain" if args.fp == "default" else f"chain_{args.fp}")
    os.makedirs(args.results, exist_ok=True)
    if not args.report:
        if "grpo" not in args.arms:
            sys.exit("chain.py: error: the arms must include grpo")
        t0 = time.time()
        study.run_all(args.contexts, seeds, args.arms, args.jobs, out_root, [], table=STUDY,
                      fp=args.fp, common=RL)  # RL only from the warm starts that reached their bar
        for c in args.contexts:
            collect(c, out_root, args.results, args.fp)
        print(f"chain study: {(time.time() - t0) / 60:.1f} min")
    all_runs = {}
    for c in CHAIN_CONTEXTS:
        path = os.path.join(args.results, f"{study.tag(c, args.fp)}.jsonl")
        if os.path.exists(path) and os.path.getsize(path):
            all_runs[c] = load(path)
    md = "\n".join(tables(runs, c) for c, runs in all_runs.items())
    name = "chain" if args.fp == "default" else f"chain_{args.fp}"
    with open(os.path.join(args.results, f"{name}.md"), "w") as f:
        f.write(md)
    print(md)
    try:
        print("figure:", figure(all_runs, os.path.join(args.results, f"{name}.png")))
    except ImportError:
        print("no figure: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    main()
