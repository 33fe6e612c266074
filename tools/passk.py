"""
pass@k of a checkpoint's student view: n samples per problem at temperature 1 on a fixed subset of
the held-out set, and the unbiased estimator pass@k = 1 - C(n - c, k) / C(n, k) for k = 1 .. n
(c of the n samples correct; Chen et al. 2021), averaged over the problems, with a 95% normal
interval over the problems (1.96 std / sqrt(P)).

    python tools/passk.py out/sft.pt out/ckpt.pt            # the warm start, and the end of RL
    python tools/passk.py --study out/teachers/default --jsonl results/teachers/passk.jsonl

The task is the checkpoint's: addition (its --digits) or tools/chain.py's chain (its --eval_size).
Every checkpoint is read on the same problems (the first --problems of the held-out set) with the
same sampling seed, so curves compare like with like. --study reads every <arm>_s<seed>/ckpt.pt of a study.py directory, and each seed's warm start
(warm_s<seed>/sft.pt), one JSON line each; --figure draws pass@k against k per arm from a --jsonl.
"""
import argparse
import json
import math
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chain  # noqa: E402  (tools/chain.py's task, read from a checkpoint that names it)
import sdpg  # noqa: E402
from data import AdditionTask, encode_batch, get_encoding, left_pad, verify  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def pass_at_k(n, c, k):
    """1 - C(n - c, k) / C(n, k): the chance that k of the n samples, drawn without replacement,
    hold at least one of the c correct ones."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def pass_at_k_curve(correct, n):
    """correct: per problem, how many of its n samples are correct. [(k, mean, ci95)] for k = 1..n:
    the mean over problems of pass_at_k and 1.96 times its standard error over problems."""
    curve = []
    for k in range(1, n + 1):
        v = np.array([pass_at_k(n, c, k) for c in correct])
        curve.append((k, float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v)))))
    return curve


@torch.no_grad()
def sample_correct(model, enc, task, problems, n, max_new_tokens, seed, batch=100):
    """Per problem, the number of correct responses among n sampled at temperature 1 from the
    student view (x alone), batch problems at a time from one seeded generator."""
    gen, counts = torch.Generator().manual_seed(seed), []
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        x_rows = encode_batch(enc, task, chunk, np.random.default_rng(sdpg.CONTEXT_SEED))[0]
        x, n_pad = left_pad(x_rows, enc.eot_token, torch.device("cpu"))
        resp, _ = model.generate(x, max_new_tokens, enc.eot_token, n, 1.0, gen, n_pad=n_pad)
        rewards = verify(enc, task, resp, chunk, n)
        counts += [int(sum(rewards[j * n:(j + 1) * n])) for j in range(len(chunk))]
    return counts


def load_model(path):
    """The student of a ckpt.pt or sft.pt written by sdpg.py, in eval mode, with the checkpoint
    and its settings (ckpt.pt: the run's config; sft.pt: its warm-start key); a file that is not
    one, or whose weights do not fit its model_args: a one-line ValueError. (Also the checkpoint
    reader of teacher_signal.py and worked_example.py.)"""
    ckpt = sdpg.load_checkpoint(path, {"model": dict})
    cfg = ckpt.get("config") or ckpt.get("key") or {}
    try:
        model = GPT(GPTConfig(**(ckpt.get("model_args") or cfg["model_args"])))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: the weights do not fit the model it names "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return model.eval(), ckpt, cfg


def read(path, n, problems, seed):
    """pass@k of one ckpt.pt or sft.pt: a record with the curve and the per-problem counts."""
    model, ckpt, cfg = load_model(path)
    max_new = cfg.get("max_new_tokens", 8)
    chain_task = re.match(r"ChainTask\(eval_size=(\d+), context='(\w+)'", str(ckpt.get("task") or cfg.get("task")))
    if chain_task:  # tools/chain.py's task: its held-out set of the run's --eval_size
        task = chain.ChainTask(int(chain_task[1]), chain_task[2])
    else:  # addition: the digits follow from the block size, c + x being 2d + 2 + d + 3 tokens;
        # the held-out set is the run's own, of its --eval_size (named in its task; else 1000)
        size = re.search(r"eval_size=(\d+)", str(ckpt.get("task") or cfg.get("task")))
        task = AdditionTask((model.config.block_size - max_new - 5) // 3,
                            eval_size=int(size[1]) if size else 1000)
    if problems > len(task.eval_set):
        raise ValueError(f"--problems {problems}: the held-out set has {len(task.eval_set)}")
    counts = sample_correct(model, get_encoding(), task, task.eval_set[:problems], n, max_new, seed)
    return {"path": path, "step": ckpt.get("step", 0), "n": n, "problems": problems, "seed": seed,
            "counts": counts, "pass_at_k": pass_at_k_curve(counts, n)}


def figure(jsonl, png):
    """pass@k against k, one line per arm (mean over seeds), from a --jsonl of --study."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = {}
    for line in open(jsonl):
        r = json.loads(line)
        arms.setdefault(r["arm"], []).append([m for _, m, _ in r["pass_at_k"]])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, curves in sorted(arms.items()):
        mean = np.mean(curves, axis=0)
        ax.plot(range(1, len(mean) + 1), mean, marker="o", ms=3, label=f"{arm} ({len(curves)} seeds)",
                ls="--" if arm == "warm" else "-", color="black" if arm == "warm" else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (held-out problems)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description="pass@k of checkpoints written by sdpg.py")
    p.add_argument("ckpts", nargs="*", help="ckpt.pt or sft.pt files")
    p.add_argument("--n", type=int, default=16, help="samples per problem (pass@k for k = 1 .. n)")
    p.add_argument("--problems", type=int, default=500, help="the first problems of the held-out set")
    p.add_argument("--seed", type=int, default=0, help="of the sampling, the same for every checkpoint")
    p.add_argument("--study", default="", help="a study.py directory: every run's ckpt.pt, every warm start")
    p.add_argument("--jsonl", default="", help="append one JSON line per checkpoint here")
    p.add_argument("--figure", default="", help="draw pass@k against k per arm from --jsonl to this PNG")
    args = p.parse_args(argv)
    if not (1 <= args.n <= 1024 and 2 <= args.problems <= 1000):
        sys.exit("passk.py: error: --n must be in [1, 1024] and --problems in [2, 1000]")
    todo = [(path, None, None) for path in args.ckpts]
    if args.study:
        for d in sorted(os.listdir(args.study)):
            arm, _, seed = d.rpartition("_s")
            name = "sft.pt" if arm == "warm" else "ckpt.pt"
            if seed.isdigit() and os.path.exists(os.path.join(args.study, d, name)):
                todo.append((os.path.join(args.study, d, name), arm, int(seed)))
    for path, arm, seed in todo:
        try:
            rec = read(path, args.n, args.problems, args.seed)
        except (ValueError, KeyError) as e:
            sys.exit(f"passk.py: error: {path}: {e}")
        rec.update(arm=arm, run_seed=seed)
        print(f"{path}: " + " | ".join(f"pass@{k} {m:.3f}" for k, m, _ in rec["pass_at_k"]
                                      if k in (1, 2, 4, 8, 16, 32, 64) or k == args.n), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(rec) + "\n")
    if args.figure:
        try:
            print(f"figure: {figure(args.jsonl, args.figure)}")
        except ImportError:
            print("no figure: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    main()
