"""
Self-Distilled Policy Gradient (SDPG, arXiv 2606.04036) in one file of plain PyTorch.

One model pi_theta, two views: the student p_t = pi_theta(.|x, y_<t) sees the problem x, the
teacher q_t = pi_theta(.|c, x, y_<t) also a privileged context c (here the answer). Rollouts
y ~ student. At RL step k = 1..T the loss, a token-mean over the response tokens, is

    L = L_out + beta(k) * L_OPD + alpha * L_ref
    L_out  = max(-A r_t, -A clip(r_t, 1-eps_low, 1+eps_high)), at most -A*dual_clip when A < 0
             r_t = pi_theta(y_t) / pi_old(y_t),  A_i = (R_i - mean_G R) / (std_G R + eps)
    L_OPD  = [A_i > 0] * min(20, sum_a p_t(a) (log p_t(a) - log SG q_t(a)))   over every token a
    L_ref  = 0.5 * (log pi_theta(y_t) - log pi_ref(y_t))^2        (urkl; ufkl, rkl, fkl too)
    beta(k) = beta * min(1, k / T_warm) * min(1, (T - k) / T_decay)

Stage 1, a supervised warm start standing in for pretraining, teaches both views; stage 2 is RL
under --recipe paper (the gate [A_i > 0], a beta triangle, clip 0.2/0.2) or release (no gate,
constant beta, clip 0.2/0.28): RECIPES below. An explicit flag wins; log.jsonl holds what ran.

Deliberate choices:
 1. The teacher is the current model, recomputed without gradient in every mini-batch, as the
    official code does (--teacher frozen reads c with pi_ref instead, its own head included).
 2. pi_ref is a frozen copy of the warm start; pi_old, the weights that sampled, gives the ratio.
 3. Every term is a token-mean over the response tokens of the global mini-batch (all ranks);
    gated-out rollouts count with zero loss. (Official: per micro-batch, close at LLM scale.)
 4. The temperature divides both views' logits (official: the student's only, and a bf16
    teacher; here the KL is fp32). The same at temperature 1.
 5. Steps k count from 1, as the official trainer's: beta(1) = beta / T_warm, and beta(T) = 0 with
    the decay on. The reward is 1/0 (the official +1/-1 gives the same advantages).
 6. Baselines as their official scripts: --algo grpo (clip 0.2/0.2, dual clip 1000, in effect none,
    no L_ref, a k1 KL penalty in the reward), rlsd (the teacher reweights the advantage per
    token), opd (the distillation and reference terms, no verifier). "Without beta" is --beta 0.
 7. Not ported: the released lr warm-up (constant here), DAPO dynamic sampling (the released
    scripts set it, its trainer never reads it), per-micro-batch normalisation.
 8. No (tokens, V) tensor: the head runs in chunks and the exact KL's backward is its closed form
    (model.fused_reverse_kl; full_vocab_reverse_kl is the readable reference). No-grad passes run
    each prompt once for its G responses (GPT.score).
Official code cited: github.com/yifanzhang-pro/SDPG at 0c818c0 (core_algos.py and ray_trainer.py
in verl/trainer/ppo/, dp_actor.py in verl/workers/actor/, examples/rpg2_trainer/*.sh).

    python sdpg.py                                      # CPU or one GPU
    torchrun --standalone --nproc_per_node=4 sdpg.py    # DDP
"""
import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import AdditionTask, encode_batch, get_encoding, sft_batch, verify
from model import GPT, GPTConfig, chunked_entropy, chunked_token_logprobs, fused_reverse_kl, \
    response_hidden

# -----------------------------------------------------------------------------
# the terms of the loss, one function each

def group_advantages(rewards, group_size, eps=1e-6):
    """A_i = (R_i - mean_G R) / (std_G R + eps), torch.std (unbiased), eps outside the root.
    (N*G,), each group's G consecutive -> (N*G,). An all-equal group gets 0: no signal."""
    r = rewards.view(-1, group_size)  # (N, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)

def rlsd_advantages(adv, teacher_logp, old_logp, lam, clip=0.2):
    """RLSD (arXiv 2604.03128; core_algos.py:461-477): delta_t = SG(clamp(log q_t(y_t) -
    log pi_old(y_t), -20, 20)), w_t = clip(exp(sign(A) delta_t), 1 - clip, 1 + clip),
    A_t = (1 - lam) A + lam A w_t. adv (B,), teacher_logp, old_logp (B, Tr) -> (B, Tr)."""
    a, delta = adv[:, None], (teacher_logp - old_logp).detach().clamp(-20, 20)
    return (1 - lam) * a + lam * a * torch.exp(torch.sign(a) * delta).clamp(1 - clip, 1 + clip)

RLSD_LAMBDA, RLSD_DECAY, RLSD_CLIP = 0.5, 50, 0.2  # lambda 0.5 -> 0 over 50 steps (core_algos.py)

def rlsd_lambda(k):
    return RLSD_LAMBDA * max(0.0, 1 - k / RLSD_DECAY)  # core_algos.py:468-474

def kl_in_reward_scores(rewards, old_logp, ref_logp, mask, coef):
    """Official GRPO's s_i = R_i - coef * sum_t (log pi_old(y_t) - log pi_ref(y_t)), k1 summed
    over the response (ray_trainer.py:91-97, core_algos.py:629). (B,), (B, Tr) x3 -> (B,)."""
    return rewards - coef * ((old_logp - ref_logp) * mask).sum(1)

def clipped_surrogate(logp, old_logp, adv, clip_low, clip_high, dual_clip):
    """l_t = max(-A r_t, -A clip(r_t, 1-clip_low, 1+clip_high)), r_t = exp(logp - old_logp), and
    for A < 0 at most -A * dual_clip. (B, Tr) each, adv broadcast. Returns l (B, Tr) and a bool
    (B, Tr), True where a clip is active (no gradient)."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    capped = (adv < 0) & (loss > -adv * dual_clip)
    return torch.where(capped, -adv * dual_clip, loss), (clipped > unclipped) | capped

def full_vocab_reverse_kl(student_logits, teacher_logits):
    """KL(p || SG q) = sum_a p(a) (log p(a) - log q(a)) over every vocabulary entry, fp32 at least,
    the teacher constant. (..., V) x2 -> (...). d/dz_s = p (log p - log q - KL)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logp = torch.log_softmax(student_logits.to(dtype), dim=-1)
    logq = torch.log_softmax(teacher_logits.detach().to(dtype), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)

def ref_penalty(logp, ref_logp, kl_mode):
    """The anchor on sampled tokens, log w = log pi_theta(y_t) - log pi_ref(y_t):
    urkl 0.5 (log w)^2, ufkl pi_ref/pi_theta + log w, rkl 0.5 (log w + 1)^2, fkl pi_ref/pi_theta.
    (B, Tr) x2 -> (B, Tr)."""
    log_w, forms = logp - ref_logp, ("urkl", "ufkl", "rkl", "fkl")
    if kl_mode not in forms:
        raise ValueError(f"unknown kl mode {kl_mode!r}: use one of {forms}")
    return {"urkl": lambda: 0.5 * log_w ** 2, "ufkl": lambda: torch.exp(-log_w) + log_w,
            "rkl": lambda: 0.5 * (log_w + 1) ** 2, "fkl": lambda: torch.exp(-log_w)}[kl_mode]()

def beta_schedule(k, total_steps, beta, warmup, decay):
    """beta(k) = beta * min(1, k / T_warm) * min(1, max(0, T - k) / T_decay), k = 1 .. T counted
    from 1 (core_algos.py:191-210). warmup or decay 0 switches that factor off."""
    up = min(1.0, k / warmup) if warmup > 0 else 1.0
    down = min(1.0, max(0.0, (total_steps - k) / decay)) if decay > 0 else 1.0
    return beta * up * down

@dataclasses.dataclass
class Rollouts:
    """Rollouts on this rank, G consecutive rows per problem: one RL step's, or a mini-batch's.
    A row per rollout, prompts repeated (rows() slices alike); no-grad passes read every G-th."""
    problems: list                     # the task's problems, one per group
    x: torch.Tensor                    # (B, Tp) student prompt of each rollout
    cx: torch.Tensor                   # (B, Tc+Tp) teacher prompt c + x of each rollout
    resp: torch.Tensor                 # (B, Tr) sampled tokens, end-of-text after a row's end
    mask: torch.Tensor                 # (B, Tr) 1.0 on response tokens to the first eot, with it
    is_eot: torch.Tensor               # (B, Tr) True at end-of-text tokens
    rewards: torch.Tensor              # (B,) the verifier's
    x_pad: Any = None      # (B,) left padding of each x; None: prompts of one length (left_pad)
    cx_pad: Any = None     # (B,) left padding of each c + x; None: one length
    old_logp: Any = None   # (B, Tr) log pi_old(y_t)   (score_rollouts)
    ref_logp: Any = None   # (B, Tr) log pi_ref(y_t)
    adv: Any = None        # (B,), or (B, Tr) per token under rlsd
    h_teacher: Any = None  # (B, Tr, H) teacher hidden states (update)
    w_teacher: Any = None  # (V, H) the teacher's output matrix
    n_tokens: float = 0.0                     # response tokens of the global mini-batch

    def rows(self, i, j, G):  # rows i to j-1, whole groups of G; each tensor but w_teacher has rows
        f = {k: v[i:j] for k, v in vars(self).items() if torch.is_tensor(v) and k != "w_teacher"}
        return dataclasses.replace(self, **f, problems=self.problems[i // G:j // G])

def minibatch_loss(model, weight, mb, args, beta, world_size):
    """One mini-batch's loss on this rank, scaled so that DDP's average over ranks is the
    token-mean over the global mini-batch. model: the student (maybe under DDP); weight: its
    output matrix (V, H), the tied embedding (DDP averages its gradient). args.algo picks the
    terms: sdpg out + ref + opd, grpo and rlsd out + ref (alpha 0 officially), opd ref + opd
    ungated. Returns the loss, metric sums and weighted terms {out, ref, opd} (sum: the loss)."""
    tau, m = args.temperature, mb.mask  # tau: the temperature
    # (B*Tr, H) via DDP; row (b, t) predicts resp[b, t], as GPT.score's do in the no-grad passes
    h = response_hidden(model, mb.x, mb.resp, mb.x_pad).flatten(0, 1)
    logp = chunked_token_logprobs(h, weight, mb.resp.flatten(), tau).view(m.shape)  # (B, Tr)
    # past a row's end the log-ratios are 0: exp() of an untrained padding position could
    # overflow, and inf * mask 0 is NaN in the gradient
    old_logp, ref_logp = (torch.where(m == 0, logp.detach(), t) for t in (mb.old_logp, mb.ref_logp))
    adv = mb.adv if mb.adv.dim() == 2 else mb.adv[:, None]  # (B, Tr) or (B, 1)
    l_out, clip_active = clipped_surrogate(logp, old_logp, adv, args.clip_low, args.clip_high,
                                           args.dual_clip)
    l_ref = ref_penalty(logp, ref_logp, args.kl_mode)
    # by name: per_token, each term times its weight (B, Tr); terms, their token-means (scalars);
    # metrics, unweighted (B, Tr), summed over this rank's response tokens
    per_token = {"out": l_out} if args.algo != "opd" else {}  # opd: no verifier term
    per_token["ref"] = args.alpha * l_ref
    metrics = {}
    if args.algo in ("sdpg", "opd"):  # each view from its own weights, over the whole vocabulary
        kl = fused_reverse_kl(h, mb.h_teacher.flatten(0, 1), weight, tau,
                              teacher_weight=mb.w_teacher).view(m.shape)  # (B, Tr)
        # min(KL, cap) per token, no gradient where capped (dp_actor.py:632)
        kl_used = torch.clamp(kl, max=args.kl_cap) if args.kl_cap > 0 else kl
        if args.opd_exclude_eot:  # (core_algos.py:213-229, 299-300)
            kl_used = kl_used * ~mb.is_eot
        gated = args.algo == "sdpg" and args.opd_gate == "positive"  # opd has no advantage
        gate = (adv > 0).float().expand_as(kl) if gated else torch.ones_like(kl)
        per_token["opd"] = beta * gate * kl_used
        metrics = {"loss_opd": gate * kl_used, "kl_teacher": kl}
    # token-mean over the global mini-batch: the sum over this rank's response tokens over those
    # of all ranks, times world_size because DDP averages the gradients over ranks
    terms = {k: (v * m).sum() * world_size / mb.n_tokens for k, v in per_token.items()}
    with torch.no_grad():
        log_w = logp - ref_logp
        metrics.update(loss=sum(per_token.values()), loss_out=l_out, loss_ref=l_ref,
                       kl_ref=torch.exp(-log_w) - 1 + log_w,  # k3 >= 0
                       entropy=chunked_entropy(h, weight, tau).view(m.shape),
                       clip_frac=clip_active.float())
        sums = {k: (v.detach() * m).sum() for k, v in metrics.items()}
    return sum(terms.values()), sums, terms


# -----------------------------------------------------------------------------
# config: every flag in one block; --help shows the value each recipe sets

# what each recipe sets (--beta, --kl_mode are flags of their own); the schedule in units of T
RECIPES = {
    # the paper's section 4.1 (gate, T_warm 50 and T_decay 350 of 400, clip 0.2/0.2); the dual
    # clip and the KL cap, on which it is silent, as the released code
    "paper": dict(opd_gate="positive", beta_warmup=1 / 8, beta_decay=7 / 8, clip_low=0.2,
                  clip_high=0.2, dual_clip=10.0, kl_cap=20.0, alpha=1e-3, kl_in_reward=0.0),
    # run_qwen3_4b_sdpg_boxed.sh:42-48 (beta, alpha, schedule and gate off, urkl), :60-61 (clip),
    # :152 (dual clip); the cap is dp_actor.py:632
    "release": dict(opd_gate="all", beta_warmup=0.0, beta_decay=0.0, clip_low=0.2, clip_high=0.28,
                    dual_clip=10.0, kl_cap=20.0, alpha=1e-3, kl_in_reward=0.0)}
BASELINES = {  # the official baseline scripts' settings, whatever the recipe
    # run_qwen3_4b_grpo_original_boxed.sh:35-43: clip 0.2/0.2, dual 1000, no L_ref, k1 in reward
    "grpo": dict(clip_low=0.2, clip_high=0.2, dual_clip=1000.0, alpha=0.0, kl_in_reward=1e-3),
    # run_qwen3_4b_rlsd_boxed.sh keeps verl's defaults (actor.yaml:36-42, 112): 0.2/0.2, dual 3
    "rlsd": dict(clip_low=0.2, clip_high=0.2, dual_clip=3.0, alpha=0.0, kl_in_reward=0.0)}
SFT_LR, SFT_HINT_FRAC, WEIGHT_DECAY = 1e-3, 0.5, 0.1  # warm start: half the problems show c
VAL_SIZE = 1000  # the warm start's validation problems: resolves its bar to about +-0.01
MAX_BAD_STEPS = 3  # stop after this many RL steps in a row with a non-finite update

def recipe_help(k, what):  # '<what>; recipe: paper 0.2, release 0.28; grpo 0.2, rlsd 0.2'
    def show(v):
        return f"{v:g}*rl_steps" if "beta_" in k and v else f"{v:g}" if type(v) is float else v
    alg = ", ".join(f"{a} {show(s[k])}" for a, s in BASELINES.items() if k in s)
    return f"{what}; recipe: " + ", ".join(f"{r} {show(s[k])}" for r, s in RECIPES.items()) + (
        f"; {alg}" if alg else "")

def number(kind, lo, hi=math.inf, above=False):  # an argparse type: a number in [lo, hi]
    def parse(text):
        v = kind(text)
        if not (lo < v if above else lo <= v) or v > hi:
            raise argparse.ArgumentTypeError(f"{text} is not in {'(' if above else '['}{lo}, {hi}]")
        return v
    return parse

count, share, nonneg, positive = number(int, 0), number(float, 0, 1), number(float, 0), \
    number(float, 0, above=True)
parser = argparse.ArgumentParser(description="SDPG on a toy addition task")
add = parser.add_argument
add("--out_dir", default="out", help="sft.pt, ckpt.pt and log.jsonl go here")
add("--resume", default="", help="continue the RL run saved in this ckpt.pt")
add("--eval_every", type=count, default=50, help="RL steps between evaluations (0: start, end)")
add("--eval_size", type=int, default=1000, help="held-out problems")
add("--eval_samples", type=count, default=4, help="n of mean@n: samples per held-out problem")
add("--seed", type=int, default=0, help="seeds the model, the data and the sampling")
add("--device", default="auto", help="auto | cpu | cuda | cuda:N")
add("--dtype", default=None, choices=["float32", "bfloat16"], help="autocast (bf16 on CUDA)")
add("--compile", action="store_true", help="torch.compile the RL training forward")
add("--digits", type=int, default=2, help="operand digits of the addition task (1 to 6)")
add("--n_layer", type=number(int, 1), default=4, help="transformer blocks")
add("--n_head", type=number(int, 1), default=4, help="attention heads")
add("--n_embd", type=number(int, 1), default=128, help="width, a multiple of --n_head")
# stage 1: the supervised warm start of both views
add("--sft_steps", type=count, default=2000, help="most warm-start steps (0 skips the stage)")
add("--sft_batch", type=number(int, 1), default=64, help="problems per warm-start step")
add("--sft_until", type=share, default=0.2, help="stop once the student solves this (0: never)")
add("--sft_teacher_until", type=share, default=0.9, help="... and the teacher view this")
# stage 2: RL
add("--rl_steps", type=count, default=300, help="RL steps T (rollout batches)")
add("--algo", default="sdpg", choices=["sdpg", "grpo", "rlsd", "opd"], help="the method")
add("--prompts_per_step", type=number(int, 1), default=32, help="prompts per step, all ranks")
add("--group_size", type=number(int, 2), default=8, help="G, responses sampled per prompt")
add("--num_minibatches", type=number(int, 1), default=2, help="updates per rollout batch")
add("--lr", type=positive, default=1e-4, help="RL AdamW learning rate")
add("--grad_clip", type=nonneg, default=1.0, help="max global grad norm, both stages (0 off)")
add("--temperature", type=positive, default=1.0, help="of the rollouts and of every log-prob")
add("--max_new_tokens", type=number(int, 1), default=8, help="longest response")
add("--beta", type=nonneg, default=0.05, help="weight of the distillation term (its peak)")
add("--kl_mode", default="urkl", choices=["urkl", "ufkl", "rkl", "fkl"], help="L_ref's form")
add("--teacher", default="current", choices=["current", "frozen"], help="the teacher's weights")
add("--opd_exclude_eot", action="store_true", help="no distillation on end-of-text tokens")
add("--recipe", default="paper", choices=list(RECIPES), help="sets the flags below")
for name, kind, what in (
        ("clip_low", number(float, 0, 0.999), "eps_low"), ("clip_high", nonneg, "eps_high"),
        ("dual_clip", number(float, 1, above=True), "the loss bound for A < 0, in -A units"),
        ("beta_warmup", nonneg, "T_warm (0 off)"), ("beta_decay", nonneg, "T_decay (0 off)"),
        ("opd_gate", str, "distil rollouts with A > 0, or all"), ("kl_cap", nonneg,
        "per-token cap of the KL (0 off)"), ("alpha", nonneg, "weight of L_ref"),
        ("kl_in_reward", nonneg, "k1 penalty in the reward")):
    add(f"--{name}", type=kind, default=None, help=recipe_help(name, what),
        **({"choices": ["positive", "all"]} if name == "opd_gate" else {}))

def resolve(args, saved=None):
    """Fill each flag left at None from the algorithm's official settings, then the recipe. The
    schedule is resolved in steps, with beta_horizon the T it ends at; a resumed run (saved: its
    config) keeps all three unless --beta_warmup or --beta_decay sets the schedule again."""
    keep = saved and args.beta_warmup is None and args.beta_decay is None
    args.beta_horizon = saved.get("beta_horizon", saved["rl_steps"]) if keep else args.rl_steps
    for k, v in {**RECIPES[args.recipe], **BASELINES.get(args.algo, {})}.items():
        if getattr(args, k) is None:
            if k in ("beta_warmup", "beta_decay"):
                v = saved[k] if saved and k in saved else v * args.rl_steps
            setattr(args, k, v)
    return args


# -----------------------------------------------------------------------------
# helpers of every phase: printing, errors, padding, the all-reduce, the run's record

def print0(*a, **kw):  # print on rank 0 only (RANK is set by torchrun)
    if os.environ.get("RANK", "0") == "0":
        print(*a, **kw, flush=True)

def die(msg):  # one line on stderr (rank 0) and exit 2, never a traceback
    print0(f"sdpg.py: error: {msg}", file=sys.stderr)
    sys.exit(2)

def left_pad(rows, pad_id, device):
    """Token lists of any lengths -> (B, L) padded on the left with pad_id, and each row's padding
    (B,), or None when every row has one length (then the model takes its unmasked path)."""
    L = max(map(len, rows))
    n_pad = [L - len(r) for r in rows]
    x = torch.tensor([[pad_id] * p + r for p, r in zip(n_pad, rows)], device=device)
    return x, torch.tensor(n_pad, device=device) if any(n_pad) else None

def per_prompt(t, G):  # the first row of each group of G rollouts; None stays None
    return None if t is None else t[::G]

def all_sum(t):  # sum a tensor over ranks in place (identity in one process); every rank calls it
    if dist.is_initialized():
        dist.all_reduce(t)
    return t

@dataclasses.dataclass
class Run:
    """What every phase reads: the config, the task, where it runs, the models and streams."""
    args: argparse.Namespace
    task: Any
    enc: Any                           # the tiktoken encoding
    device: torch.device
    ctx: Any                           # autocast to bf16, or nullcontext for fp32
    rank: int
    world_size: int
    log: Any                           # log(record): a JSON line in log.jsonl (rank 0)
    model: Any = None        # pi_theta, unwrapped: every no-grad pass uses it
    train_model: Any = None            # model under DDP and compile: the gradient passes
    ref_model: Any = None    # pi_ref, the frozen warm start
    teacher: Any = None      # the weights that read c: model, or ref_model if frozen
    optimizer: Any = None
    rl_rng: Any = None                 # numpy Generator: problems, random contexts
    gen: Any = None  # rollout sampling
    stopped: bool = False              # Ctrl-C or SIGTERM ended RL before its last step


# -----------------------------------------------------------------------------
# stage 1: the supervised warm start of both views, cached in sft.pt

def warm_start(run, train_model, stop):
    """Cross-entropy on the reference answers, half the problems shown with c, until the student
    view solves --sft_until of a validation set and the teacher view --sft_teacher_until, or
    --sft_steps. Returns (finished, val): val the accuracies if short. Addition is learned in a
    jump of a point or two a step, so the check comes every 10 steps and, once the student is
    halfway to its bar, every step: RL starts at the bar, not past it."""
    args, model = run.args, run.model
    opt = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=WEIGHT_DECAY)
    rng, t_start, next_check = np.random.default_rng([args.seed, run.rank, 0]), time.time(), 10
    val_set = run.task.sample(np.random.default_rng([args.seed, 2]), VAL_SIZE)  # not the eval set
    for step in range(1, args.sft_steps + 1):
        x, y = (torch.tensor(v, device=run.device) for v in sft_batch(
            run.enc, run.task, rng, args.sft_batch // run.world_size, SFT_HINT_FRAC))
        with run.ctx:
            h = train_model(x, return_hidden=True)[y >= 0]  # (n, H): only where a label is
        # mean over this rank's response tokens; DDP averages the ranks (the token-mean over all
        # ranks when each holds as many tokens, as under addition)
        loss = -chunked_token_logprobs(h, model.lm_head_weight, y[y >= 0]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        # Ctrl-C: under DDP the ranks agree every 25 steps (an all-reduce and a host sync)
        if (not dist.is_initialized() or step % 25 == 0 or step == args.sft_steps) and \
                stop.any_rank(run.device):
            print0("interrupted during the warm start: nothing saved")
            return False, None
        if step % 100 == 0 or step == args.sft_steps:
            loss_avg, t = all_sum(loss.detach().clone()).item() / run.world_size, time.time()
            print0(f"sft {step}/{args.sft_steps} | loss {loss_avg:.4f} | {t - t_start:.0f}s")
            run.log({"phase": "sft", "step": step, "loss": loss_avg, "time": t - t_start})
        if args.sft_until > 0 and (step == next_check or step == args.sft_steps):
            student = evaluate(run, model, val_set, ("student",))[0]
            next_check = step + (1 if student >= args.sft_until / 2 else 10)
            if student < args.sft_until and step < args.sft_steps:
                continue  # the teacher view is checked once the student has its bar
            val = student, evaluate(run, model, val_set, ("teacher",))[1]
            if val[0] >= args.sft_until and val[1] >= args.sft_teacher_until:  # both views
                print0(f"sft {step} | val acc {val[0]:.3f}, teacher {val[1]:.3f}: warm start done")
                run.log(dict(phase="sft", step=step, val_acc=val[0], val_teacher_acc=val[1]))
                return True, None
            if step == args.sft_steps:
                return True, val
    return True, None


# -----------------------------------------------------------------------------
# evaluation: greedy accuracy of both views, and mean@n of the student

CONTEXT_SEED = 4321  # draws the held-out contexts that involve chance: the same every time

def generate_padded(run, model, rows, n=1, temperature=0.0, gen=None):  # rows: token lists
    x, n_pad = left_pad(rows, run.enc.eot_token, run.device)  # -> n responses each, their masks
    with run.ctx:
        return model.generate(x, run.args.max_new_tokens, run.enc.eot_token, n, temperature, gen,
                              n_pad=n_pad)

@torch.no_grad()
def evaluate(run, model, problems, views=("student", "teacher")):
    """Greedy accuracy of model's student view (x) and teacher view (c + x), of those in views
    (None for the other), sharded over ranks as problems[rank::world_size]: each rank counts its
    own shard, the sums are over all."""
    mine = problems[run.rank::run.world_size]
    prompts = encode_batch(run.enc, run.task, problems, np.random.default_rng(CONTEXT_SEED))[:2]
    correct = torch.zeros(3, device=run.device)  # student, teacher, problems
    for i, view in enumerate(("student", "teacher")):
        if mine and view in views:
            resp, _ = generate_padded(run, model, prompts[i][run.rank::run.world_size])
            correct[i] = sum(verify(run.enc, run.task, resp, mine))
    correct[2] = len(mine)
    s, t, n = all_sum(correct).tolist()
    return tuple(v / n if view in views else None for v, view in ((s, "student"), (t, "teacher")))

@torch.no_grad()
def mean_at_n(run, problems, n):
    """mean@n, the paper's metric: accuracy over n temperature-1 samples per problem, and a 95%
    normal interval over problems. Its own generator: the training streams do not move."""
    mine = problems[run.rank::run.world_size]
    stats = torch.zeros(3, dtype=torch.float64, device=run.device)  # sum acc, sum acc^2, count
    if mine:
        x = encode_batch(run.enc, run.task, mine, np.random.default_rng(CONTEXT_SEED))[0]
        gen = torch.Generator(device=run.device).manual_seed(run.args.seed + 7919 + run.rank)
        resp, _ = generate_padded(run, run.model, x, n, 1.0, gen)
        acc = torch.tensor(verify(run.enc, run.task, resp, mine, n)).double().view(-1, n).mean(1)
        stats += torch.tensor([acc.sum(), (acc ** 2).sum(), len(mine)], device=run.device)
    s1, s2, count = all_sum(stats).tolist()
    mean = s1 / count
    return mean, 1.96 * math.sqrt(max(0.0, s2 / count - mean ** 2) / max(1, count - 1))

def run_eval(run, k):  # evaluate at RL step k; print, log and return the record
    a, problems = run.args, run.task.eval_set
    rec = dict(zip(("phase", "step", "eval_acc", "teacher_acc"),
                   ("eval", k, *evaluate(run, run.model, problems))))
    if a.teacher == "frozen":  # the teacher distilled from, besides the current weights' view
        rec["frozen_teacher_acc"] = evaluate(run, run.ref_model, problems, ("teacher",))[1]
    if a.eval_samples:
        rec[f"mean@{a.eval_samples}"], rec[f"mean@{a.eval_samples}_ci95"] = mean_at_n(
            run, problems, a.eval_samples)
    print0(f"eval step {k}/{a.rl_steps} | " + " | ".join(f"{name} {v:.3f}" for name, v in
                                                         list(rec.items())[2:]))
    run.log(rec)
    return rec


# -----------------------------------------------------------------------------
# stage 2: one RL step in four phases: rollouts, scoring, updates, the step's record

def sample_rollouts(run, n_prompts):
    """Phase 1: problems, G responses to each from the student view (which never holds c), and
    the verifier's rewards."""
    a, G = run.args, run.args.group_size
    problems = run.task.sample(run.rl_rng, n_prompts)
    x_rows, cx_rows, _ = encode_batch(run.enc, run.task, problems, run.rl_rng)  # draws contexts
    (x, x_pad), (cx, cx_pad) = (left_pad(v, run.enc.eot_token, run.device) for v in (x_rows,
                                                                                     cx_rows))
    with run.ctx:
        resp, mask = run.model.generate(x, a.max_new_tokens, run.enc.eot_token, G, a.temperature,
                                        run.gen, n_pad=x_pad)
    rewards = torch.tensor(verify(run.enc, run.task, resp, problems, G), device=run.device)
    x, cx, x_pad, cx_pad = (None if t is None else t.repeat_interleave(G, 0)  # per rollout
                            for t in (x, cx, x_pad, cx_pad))
    return Rollouts(problems, x, cx, resp, mask, resp == run.enc.eot_token, rewards, x_pad, cx_pad)

def score_rollouts(run, batch, k):
    """Phase 2, filling batch.old_logp, ref_logp, adv: log-probs of the sampled tokens under pi_old
    (the sampling weights) and pi_ref; group-relative advantages, official GRPO's of the reward less
    its KL penalty, rlsd's reweighted by teacher log-probs once a batch (ray_trainer.py:1632)."""
    a, G, tau = run.args, run.args.group_size, run.args.temperature
    with torch.no_grad(), run.ctx:
        x, x_pad = batch.x[::G], per_prompt(batch.x_pad, G)
        batch.old_logp = run.model.token_logprobs(x, batch.resp, G, tau, x_pad)  # (B, Tr)
        batch.ref_logp = run.ref_model.token_logprobs(x, batch.resp, G, tau, x_pad)
        if a.algo == "rlsd":
            teacher_logp = run.teacher.token_logprobs(batch.cx[::G], batch.resp, G, tau,
                                                      per_prompt(batch.cx_pad, G))
    scores = batch.rewards
    if a.kl_in_reward:
        scores = kl_in_reward_scores(scores, batch.old_logp, batch.ref_logp, batch.mask,
                                     a.kl_in_reward)
    batch.adv = group_advantages(scores, G)
    if a.algo == "rlsd":
        batch.adv = rlsd_advantages(batch.adv, teacher_logp, batch.old_logp, rlsd_lambda(k),
                                    RLSD_CLIP)

def update(run, batch, beta, k, hook):
    """Phase 3: --num_minibatches AdamW steps on slices of whole groups: the teacher's hidden
    states (no gradient), the loss, backward, and the step unless the gradient is not finite.
    Returns the metric sums by name, the skipped updates and the hook's fields."""
    a, G = run.args, run.args.group_size
    n = len(batch.resp) // a.num_minibatches  # rollouts per mini-batch on this rank
    # response tokens of each global mini-batch, one all-reduce for all (every rank calls it)
    n_tokens = all_sum(batch.mask.reshape(a.num_minibatches, n, -1).sum((1, 2))).tolist()
    sums, skipped, extra = {}, 0, {}
    for j in range(a.num_minibatches):
        mb = dataclasses.replace(batch.rows(j * n, (j + 1) * n, G), n_tokens=n_tokens[j])
        # the teacher view reads c + x + y, c + x once per prompt; q_t = softmax(h_teacher
        # w_teacher^T / tau) is formed in chunks inside fused_reverse_kl, never as (B, Tr, V)
        if a.algo in ("sdpg", "opd"):
            with torch.no_grad(), run.ctx:
                mb.h_teacher = run.teacher.score(mb.cx[::G], mb.resp, G,
                                                 per_prompt(mb.cx_pad, G))  # (B, Tr, H)
            mb.w_teacher = run.teacher.lm_head_weight.detach()
        if hook is not None and j == 0:
            extra = hook(run, k, beta, mb) or {}
        with run.ctx:
            loss, mb_sums, _ = minibatch_loss(run.train_model, run.model.lm_head_weight, mb, a,
                                              beta, run.world_size)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the norm is of the gradients DDP already averaged, so every rank takes the same branch
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                                         a.grad_clip or math.inf)):
            run.optimizer.step()
        else:  # a non-finite loss or gradient: skip, keep the weights and Adam's moments
            skipped += 1
        sums = {name: sums.get(name, 0) + v for name, v in mb_sums.items()}
    return sums, skipped, extra

def step_record(run, k, batch, sums, beta, dt, skipped, extra):
    """Phase 4: log the step over all ranks: token terms per response token, the reward per
    rollout, signal_frac the groups whose rewards differ (A = 0 elsewhere, unless kl_in_reward)."""
    G, r = run.args.group_size, batch.rewards.view(-1, run.args.group_size)
    t = {**sums, "signal": (r.amax(1) != r.amin(1)).sum(), "reward": batch.rewards.sum(),
         "tokens": batch.mask.sum(), "rollouts": torch.tensor(float(len(batch.rewards)))}
    t = dict(zip(t, all_sum(torch.stack([v.float().to(run.device) for v in t.values()])).tolist()))
    rec = {"phase": "rl", "step": k, "reward": t["reward"] / t["rollouts"],
           "signal_frac": t["signal"] * G / t["rollouts"], "resp_len": t["tokens"] / t["rollouts"],
           **{name: t[name] / t["tokens"] for name in sums}, "beta": beta,
           **({"rlsd_lambda": rlsd_lambda(k)} if run.args.algo == "rlsd" else {}),
           "tok_per_s": t["tokens"] / dt, "dt": dt, "skipped": skipped, **extra}
    print0(f"step {k}/{run.args.rl_steps} | " + " | ".join(f"{name} {v:.4g}" for name, v in
                                                         list(rec.items())[2:]))
    run.log(rec)


# -----------------------------------------------------------------------------
# the run: setup, stage 1, stage 2

def train(args, task, hook=None, ckpt=None):
    """Both stages: setup, the warm start (or its cache), RL from step 1 (or from ckpt, a
    checkpoint's contents) with evaluations and checkpoints; returns the Run. The extension point
    of tools/: hook(run, k, beta, mb), if given, sees each step's first mini-batch (Rollouts)
    before its update, changing nothing, and the dict it returns is logged with the step."""
    rank, local_rank, world_size, device, use_cuda = setup_distributed(args)
    args.dtype = args.dtype or ("bfloat16" if use_cuda else "float32")  # the config logs it
    ctx = torch.autocast(device.type, torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    enc = get_encoding()
    # the block size: the longest held-out teacher prompt c + x and --max_new_tokens after it
    _, cx_rows, target = encode_batch(enc, task, task.eval_set, np.random.default_rng(0))
    check_sizes(args, world_size, max(map(len, target)))  # the batches split, the answer fits
    model_args = dict(block_size=max(map(len, cx_rows)) + args.max_new_tokens, n_layer=args.n_layer,
                      vocab_size=enc.n_vocab, n_head=args.n_head, n_embd=args.n_embd)
    if ckpt is not None:  # every check before the log is written
        check_resume(args, task, ckpt, model_args)
    run = Run(args, task, enc, device, ctx, rank, world_size, open_log(args, rank))
    stop = StopRequest()  # Ctrl-C: finish the step, save, exit
    run.log({"phase": "config", **vars(args), "task": repr(task), "world_size": world_size,
             "device": str(device), "torch": torch.__version__, "numpy": np.__version__,
             "python": sys.version.split()[0]})
    torch.manual_seed(args.seed)  # the same on every rank: the same initial weights
    run.model = model = GPT(GPTConfig(**model_args)).to(device)
    print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | "
           f"vocab {run.enc.n_vocab} | device {device} | world {world_size}")

    def wrap(m):  # the gradient passes go through DDP, which averages gradients over ranks
        return DDP(m, device_ids=[local_rank] if use_cuda else None) if dist.is_initialized() else m

    # stage 1, cached in sft.pt under the key of all its inputs
    sft_path, key = os.path.join(args.out_dir, "sft.pt"), sft_key(run, model_args)
    cached, val = None if ckpt is not None else read_sft(sft_path, key), None
    if cached is not None:
        model.load_state_dict(cached["model"])
        print0(f"warm start: reusing {sft_path}")
        val = cached.get("val")
    elif ckpt is None and args.sft_steps > 0:
        finished, val = warm_start(run, wrap(model), stop)
        if not finished:  # interrupted
            teardown(run)
            raise SystemExit(130)
        save_or_stop(run, lambda: {"model": model.state_dict(), "key": key, "val": val}, sft_path)
    if val:  # below its bars, now or when it ran
        shortfall(run, val)

    # stage 2: RL
    run.ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # pi_ref
    run.teacher = model if args.teacher == "current" else run.ref_model
    run.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    run.rl_rng = np.random.default_rng([args.seed, rank, 1])  # problems
    run.gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)  # sampling
    start, evaluated, evals = resume(run, ckpt) if ckpt is not None else (0, False, [None, None])
    run.train_model = torch.compile(wrap(model)) if args.compile else wrap(model)
    if not evaluated:  # the first and the latest evaluation, for the summary and the checkpoint
        evals = [evals[0], run_eval(run, start)]
        evals[0] = evals[0] or evals[1]
    t_run, bad_streak = time.time(), 0
    for k in range(start + 1, args.rl_steps + 1):  # the official step numbering starts at 1
        t0 = time.perf_counter()
        # T of the schedule: --rl_steps, or the T a resumed run started with (resolve)
        beta = beta_schedule(k, args.beta_horizon, args.beta, args.beta_warmup, args.beta_decay) \
            if args.algo in ("sdpg", "opd") else 0.0
        batch = sample_rollouts(run, args.prompts_per_step // world_size)
        score_rollouts(run, batch, k)
        sums, skipped, extra = update(run, batch, beta, k, hook)
        if use_cuda:
            torch.cuda.synchronize()  # for the step's time
        step_record(run, k, batch, sums, beta, time.perf_counter() - t0, skipped, extra)
        evaluated = (args.eval_every and k % args.eval_every == 0) or k == args.rl_steps
        if evaluated:
            evals[1] = run_eval(run, k)
            save_checkpoint(run, k, True, evals)
        bad_streak = bad_streak + 1 if skipped else 0
        if bad_streak >= MAX_BAD_STEPS:  # the last checkpoint is kept
            die_all(f"{bad_streak} steps in a row had non-finite gradients; try a lower --lr", run)
        if stop.any_rank(device):
            if not evaluated:
                save_checkpoint(run, k, False, evals)
            print0(f"interrupted: stopped after step {k}/{args.rl_steps}; continue with "
                   f"--resume {os.path.join(args.out_dir, 'ckpt.pt')}")
            break
    run.stopped = stop.requested
    if start == args.rl_steps:
        save_checkpoint(run, start, True, evals)
    first, last = evals
    acc = " | ".join(f"{v} {first[v]:.3f} (step {first['step']}) -> {last[v]:.3f} (step "
                     f"{last['step']})" for v in ("eval_acc", "teacher_acc"))
    print0(f"{'stopped' if stop.requested else 'done'}: RL {time.time() - t_run:.0f}s | {acc} | "
           f"files in {args.out_dir}/ | curves: python tools/plot.py {args.out_dir}/log.jsonl")
    teardown(run)
    return run

def main(argv=None, task=None, hook=None):
    """python sdpg.py [flags]: parse, check, train. Tools call it with a task or a hook."""
    args = parser.parse_args(argv)
    ckpt = read_resume(args.resume) if args.resume else None
    args = resolve(args, ckpt["config"] if ckpt else None)
    validate(args)
    try:
        task = task or AdditionTask(args.digits, args.eval_size)  # the task interface: data.py
    except ValueError as e:
        die(str(e))
    return train(args, task, hook, ckpt)


# =============================================================================
# What a first reading may skip: devices and processes, logging, signals, the warm-start
# cache, checkpoints, flag checks.
# =============================================================================

def setup_distributed(args):
    """One process per device under torchrun (nccl on CUDA, gloo on CPU), each on
    cuda:LOCAL_RANK; else one process. Returns (rank, local_rank, world_size, device, use_cuda)."""
    env = {k: int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0),
                                                      ("WORLD_SIZE", 1), ("LOCAL_WORLD_SIZE", 0))}
    ddp, local_rank = "RANK" in os.environ, env["LOCAL_RANK"]
    use_cuda = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
    device = torch.device("cpu")
    if use_cuda:
        n = torch.cuda.device_count()
        if ddp and args.device not in ("auto", "cuda"):
            die(f"--device {args.device} cannot be used under torchrun: each process takes "
                f"cuda:LOCAL_RANK (use --device cuda, and CUDA_VISIBLE_DEVICES to choose)")
        if ddp and max(env["LOCAL_WORLD_SIZE"], local_rank + 1) > n:  # every process checks
            die(f"torchrun started more processes on this node than it has GPUs ({n}): use "
                f"--nproc_per_node <= {n}, or --device cpu")
        device = torch.device(args.device if ":" in args.device else f"cuda:{local_rank}")
        if device.index >= n:
            die(f"--device {args.device}: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
        torch.cuda.set_device(device)  # before the process group, so that nccl binds this GPU
    if ddp:
        dist.init_process_group(**(dict(backend="nccl", device_id=device) if use_cuda else
                                   dict(backend="gloo")))
    return env["RANK"], local_rank, env["WORLD_SIZE"], device, use_cuda

def shortfall(run, val):  # say and log that RL starts from a weaker model than asked
    a = run.args
    print0(f"warm start: {a.sft_steps} steps did not reach the bars (student {val[0]:.3f} of "
           f"{a.sft_until}, teacher {val[1]:.3f} of {a.sft_teacher_until}); RL starts anyway")
    run.log({"phase": "sft", "reached": False, "val_acc": val[0], "val_teacher_acc": val[1]})

def sft_key(run, model_args):  # every input of stage 1: sft.pt is reused only if all are equal
    key = {k: getattr(run.args, k) for k in ("seed", "sft_steps", "sft_batch", "sft_until",
           "sft_teacher_until", "grad_clip", "max_new_tokens", "dtype")}
    return dict(key, task=repr(run.task), tokenizer=run.enc.name, model_args=model_args,
                world_size=run.world_size, device=run.device.type, sft_lr=SFT_LR,
                hint_frac=SFT_HINT_FRAC, weight_decay=WEIGHT_DECAY, val_size=VAL_SIZE)

def open_log(args, rank):  # log(record): a JSON line in log.jsonl from rank 0; resumes append
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        f = open(os.path.join(args.out_dir, "log.jsonl"), "a" if args.resume else "w") \
            if rank == 0 else None
    except OSError as e:
        die(f"--out_dir {args.out_dir}: {e.strerror}")
    return lambda record: f and (f.write(json.dumps(record) + "\n"), f.flush())

def teardown(run=None):  # every rank calls it: leave the process group together
    if dist.is_initialized():
        if run is not None:  # drop the DDP wrapper first: gloo can abort when a group outlives it
            run.train_model = None
            gc.collect()
        dist.barrier()  # rank 0 may still be saving; a process that exits alone can abort
        dist.destroy_process_group()

def die_all(msg, run=None):  # die(msg) where every rank stops at once (exit 2, not an abort)
    teardown(run)
    die(msg)

class StopRequest:
    """Ctrl-C or SIGTERM: finish the step, save, exit; one more 2 s later stops at once (torchrun
    forwards the first twice, and kills its workers 30 s after its own signal)."""
    def __init__(self):
        self.requested, self.when = False, 0.0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.requested and time.time() - self.when > 2:
            raise KeyboardInterrupt
        self.requested, self.when = True, self.when or time.time()

    def any_rank(self, device):  # every rank calls it: under DDP an all-reduce and a host sync
        if not dist.is_initialized():
            return self.requested
        return all_sum(torch.tensor(float(self.requested), device=device)).item() > 0

def save_atomic(obj, path):  # to path.tmp, then renamed: a kill mid-save keeps the old file
    try:
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    except BaseException:
        if os.path.isfile(path + ".tmp"):
            os.remove(path + ".tmp")
        raise

def save_or_stop(run, make, path):  # rank 0 saves make(); if that fails, every rank stops
    err = [""]
    if run.rank == 0:
        try:
            save_atomic(make(), path)
        except (OSError, RuntimeError) as e:  # disk full, no permission (torch.save raises either)
            why = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1][-120:]
            err = [f"saving {path}: {why}; the previous file is intact"]
    if dist.is_initialized():
        dist.broadcast_object_list(err, src=0)
    if err[0]:
        die_all(err[0], run)

def save_checkpoint(run, step, evaluated, evals):  # every rank calls it
    rngs = [{"numpy": run.rl_rng.bit_generator.state, "torch_gen": run.gen.get_state(),
             "torch": torch.get_rng_state(), "device": run.gen.device.type}] * run.world_size
    if dist.is_initialized():
        dist.all_gather_object(rngs, rngs[0])
    save_or_stop(run, lambda: dict(
        model=run.model.state_dict(), ref_model=run.ref_model.state_dict(), rng=rngs, step=step,
        optimizer=run.optimizer.state_dict(), model_args=vars(run.model.config),
        config=vars(run.args), task=repr(run.task), evaluated=evaluated, evals=evals),
        os.path.join(run.args.out_dir, "ckpt.pt"))

def load_checkpoint(path, types):
    """torch.load with weights_only (no pickled code runs), each field of types checked: a
    ValueError of one line if unreadable, truncated, not ours, or a field is missing or bad."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the file is: one line, never a traceback
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"{path}: not a readable SDPG checkpoint ({type(e).__name__}: {first})") \
            from None
    bad = [k for k, t in types.items() if not isinstance(ckpt, dict) or not isinstance(
        ckpt.get(k), t) or isinstance(ckpt[k], bool) or (t is int and ckpt[k] < 0)]
    if bad:
        raise ValueError(f"{path}: not an SDPG checkpoint (no valid {', '.join(bad)})")
    return ckpt

def read_sft(path, key):  # sft.pt's contents if readable and made from these inputs, else None
    try:
        cached = load_checkpoint(path, dict(model=dict, key=dict)) if os.path.exists(path) else None
    except ValueError as e:
        print0(f"warm start: ignoring {e}")
        return None
    return cached if cached is not None and cached["key"] == key else None

def read_resume(path):  # the checkpoint --resume names, its fields and its schedule checked
    if not os.path.isfile(path):
        die(f"--resume {path}: no such file")
    try:
        ckpt = load_checkpoint(path, dict(model=dict, ref_model=dict, optimizer=dict, step=int,
                                          model_args=dict, config=dict, rng=list))
    except ValueError as e:
        die(f"--resume {e}")
    schedule = [ckpt["config"].get(k, 0) for k in ("rl_steps", "beta_warmup", "beta_decay",
                                                   "beta_horizon")]
    if "rl_steps" not in ckpt["config"] or not all(type(v) in (int, float) and v >= 0
                                                   for v in schedule):
        die(f"--resume {path}: not an SDPG checkpoint (no valid schedule in its config)")
    return ckpt

# a resumed run continues the same algorithm: these flags must equal the checkpoint's
SAME_ON_RESUME = ("algo", "recipe", "beta", "alpha", "clip_low", "clip_high", "dual_clip",
                  "opd_gate", "kl_cap", "opd_exclude_eot", "kl_in_reward", "kl_mode", "teacher",
                  "group_size", "prompts_per_step", "num_minibatches", "temperature", "lr",
                  "grad_clip", "max_new_tokens", "seed")

def check_resume(a, task, ckpt, model_args):  # one line for a resume that would change the run
    path, config = a.resume, ckpt["config"]
    for k in (k for k in SAME_ON_RESUME if k in config and config[k] != getattr(a, k)):
        die_all(f"--resume: --{k} {getattr(a, k)} differs from the run it continues ({config[k]}); "
                f"a resumed run keeps its algorithm (start a new run)")
    if ckpt["step"] > a.rl_steps or ckpt.get("task", repr(task)) != repr(task):
        die_all(f"--resume: the checkpoint (step {ckpt['step']} of {ckpt.get('task')}) cannot "
                f"continue as --rl_steps {a.rl_steps} of {task!r}")
    if ckpt["model_args"] != model_args:
        die_all(f"--resume {path}: its model {ckpt['model_args']} differs from this run's "
                f"{model_args}; use the flags it was trained with")

def resume(run, ckpt):
    """Refuse in one line a resume that changes the run; load ckpt into the models and Adam, and
    this rank's random streams if the world size and device type are the same and the states fit
    (else fresh ones, with a line). Returns (step, its evaluation logged?, [first, latest])."""
    path, config, a = run.args.resume, ckpt["config"], run.args
    try:
        run.model.load_state_dict(ckpt["model"])
        run.ref_model.load_state_dict(ckpt["ref_model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except Exception as e:  # shapes, names, Adam's state: one line
        die_all(f"--resume {path}: its weights do not fit the model ({type(e).__name__})")
    fresh = (run.rl_rng.bit_generator.state, run.gen.get_state(), torch.get_rng_state())
    try:
        s = ckpt["rng"][run.rank]
        why = f"saved with {len(ckpt['rng'])} ranks on {s['device']}, running {run.world_size} " \
              f"on {run.device.type}"
        if len(ckpt["rng"]) == run.world_size and s["device"] == run.device.type:
            why = None
            run.rl_rng.bit_generator.state = s["numpy"]
            run.gen.set_state(s["torch_gen"])
            torch.set_rng_state(s["torch"])
    except Exception:  # states that do not fit their device, or malformed ones
        run.rl_rng.bit_generator.state, why = fresh[0], "its streams do not fit"
        run.gen.set_state(fresh[1])
        torch.set_rng_state(fresh[2])
    if why:
        print0(f"resume: {why}: new random streams")
    saved = {"beta_horizon": config["rl_steps"], **config}  # older checkpoints: the run's own T
    changed = {k: [saved.get(k), getattr(a, k)] for k in ("rl_steps", "beta_warmup", "beta_decay",
               "beta_horizon") if saved.get(k) != getattr(a, k)}
    for k in sorted(set(changed) - {"rl_steps"}):
        print0(f"resume: {k} {changed[k][1]} replaces the checkpoint's {changed[k][0]}")
    if a.beta_horizon != a.rl_steps:
        print0(f"resume: beta keeps the schedule it ran with, which ends at step {a.beta_horizon}")
    print0(f"resumed from {path} at step {ckpt['step']}")
    run.log({"phase": "resume", "step": ckpt["step"], "from": path, "changed": changed})
    evals = ckpt.get("evals")  # [first, latest] evaluation records, checked as every field
    ok = isinstance(evals, list) and len(evals) == 2 and all(
        isinstance(e, dict) and {"step", "eval_acc", "teacher_acc"} <= set(e) for e in evals)
    return ckpt["step"], ckpt.get("evaluated") is True and ok, evals if ok else [None, None]

def check_sizes(args, world_size, longest_answer):  # one line and exit 2 if not (every rank)
    if args.prompts_per_step % (world_size * args.num_minibatches) or args.sft_batch % world_size:
        die_all(f"--prompts_per_step {args.prompts_per_step} must split evenly over {world_size} "
                f"ranks x {args.num_minibatches} mini-batches, and --sft_batch over the ranks")
    if args.max_new_tokens < longest_answer:
        die_all(f"--max_new_tokens must be >= {longest_answer}: the answer and end-of-text")

def validate(a):  # the flag checks that no flag's type makes; one line and exit 2 at the first
    for ok, msg in [
        (a.n_embd % a.n_head == 0, "--n_embd must be a multiple of --n_head"),
        (a.device in ("auto", "cpu") or re.fullmatch(r"cuda(:[0-9]+)?", a.device),
         f"--device {a.device}: use auto, cpu, cuda or cuda:N"),
        (not a.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {a.device}: CUDA is not available on this machine")]:
        if not ok:
            die(msg)


parser.error = die  # argparse's own errors (unknown flag, bad choice) are one line too

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C: at once, without saving
        print0("sdpg.py: interrupted twice: stopped at once; the last checkpoint is kept")
        sys.exit(130)
