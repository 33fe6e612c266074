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
    beta(k) = beta * min(1, k / T_warm) * min(1, (T - k) / T_decay)   (steps; flags: shares of T)

Stage 1, a supervised warm start standing in for pretraining, teaches both views; stage 2 is RL
under --recipe paper (the gate [A_i > 0], a beta triangle, clip 0.2/0.2) or release (no gate,
constant beta, clip 0.2/0.28): RECIPES below. A typed flag wins; log.jsonl holds what ran.

Deliberate choices:
 1. The teacher is the teacher view (c + x) of the weights --teacher names: by default the
    current model, recomputed without gradient in every mini-batch, as the official code does;
    frozen: pi_ref (head included); ema: an EMA of the model. teacher_acc logs this teacher.
 2. pi_ref is a frozen copy of the warm start; pi_old, the weights that sampled, gives the ratio.
 3. Every term is a token-mean over the response tokens of the global mini-batch (all ranks);
    gated-out rollouts count with zero loss. (Official: per micro-batch, close at LLM scale.)
 4. The temperature divides both views' logits (official: the student's only, and a bf16
    teacher; here the KL is fp32). The same at temperature 1.
 5. Steps count from 1, as the official trainer's: beta(1) = beta / T_warm; beta(T) = 0 with the
    decay on. The reward is 1/0 (official +1/-1: the same advantages unless kl_in_reward > 0).
 6. Baselines as their official scripts: --algo grpo (clip 0.2/0.2, no dual clip, no L_ref, a k1
    penalty in the reward) and rlsd (the teacher reweights the advantage per token). --algo
    distill is L_OPD and L_ref without L_out (no official script); --beta 0 is SDPG without beta.
 7. Not ported: the released lr warm-up, DAPO dynamic sampling (set, never read by the trainer).
 8. The exact KL runs the head in chunks with its closed-form backward (model.fused_reverse_kl;
    full_vocab_reverse_kl below is the definition it is tested against).
Official code cited: github.com/yifanzhang-pro/SDPG at 0c818c0 (core_algos.py and ray_trainer.py
in verl/trainer/ppo/, dp_actor.py in verl/workers/actor/, examples/rpg2_trainer/*.sh).
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

from data import AdditionTask, encode_batch, get_encoding, left_pad, sft_batch, verify
from model import GPT, GPTConfig, chunked_entropy, chunked_token_logprobs, fused_reverse_kl, \
    response_hidden

# ---- the terms of the loss, one function each ---------------------------------------------------

def group_advantages(rewards, group_size, eps=1e-6):
    """A_i = (R_i - mean_G R) / (std_G R + eps), torch.std (unbiased), eps outside the root.
    (N*G,), each group's G consecutive -> (N*G,). An all-equal group gets 0: no signal."""
    r = rewards.view(-1, group_size)  # (N, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)

RLSD_LAMBDA, RLSD_DECAY, RLSD_CLIP = 0.5, 50, 0.2  # lambda 0.5 -> 0 over 50 steps (core_algos.py)

def rlsd_advantages(adv, teacher_logp, old_logp, lam, clip=RLSD_CLIP):
    """RLSD (arXiv 2604.03128; core_algos.py:461-477): delta_t = SG(clamp(log q_t(y_t) -
    log pi_old(y_t), -20, 20)), w_t = clip(exp(sign(A) delta_t), 1 - clip, 1 + clip),
    A_t = (1 - lam) A + lam A w_t. adv (B,), teacher_logp, old_logp (B, Tr) -> (B, Tr)."""
    a, delta = adv[:, None], (teacher_logp - old_logp).detach().clamp(-20, 20)
    return (1 - lam) * a + lam * a * torch.exp(torch.sign(a) * delta).clamp(1 - clip, 1 + clip)

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
    from 1 (core_algos.py:191-210); T_warm = warmup * T, T_decay = decay * T; 0 turns one off."""
    up = min(1.0, k / (warmup * total_steps)) if warmup > 0 else 1.0
    down = min(1.0, max(0.0, (total_steps - k) / (decay * total_steps))) if decay > 0 else 1.0
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

    def rows(self, i, j, G):  # rows i to j-1, whole groups of G; each tensor but w_teacher has rows
        f = {k: v[i:j] for k, v in vars(self).items() if torch.is_tensor(v) and k != "w_teacher"}
        return dataclasses.replace(self, **f, problems=self.problems[i // G:j // G])

def minibatch_loss(model, weight, mb, n_tokens, args, beta_k, world_size):
    """One mini-batch's loss on this rank, scaled so that DDP's average over ranks is the token-
    mean over the global mini-batch. model: the student (maybe under DDP); weight: its output
    matrix (V, H), the tied embedding; mb: this rank's rows, n_tokens: the response tokens of all
    ranks' rows; beta_k: beta(k). Terms by args.algo: sdpg out + ref + opd,
    grpo and rlsd out + ref, distill ref + opd ungated. Returns loss, sums, weighted terms."""
    tau, mask = args.temperature, mb.mask  # the temperature; (B, Tr) 1.0 on response tokens
    # (B*Tr, H) via DDP; row (b, t) predicts resp[b, t], as in the no-grad passes (update)
    h = response_hidden(model, mb.x, mb.resp, mb.x_pad).flatten(0, 1)
    logp = chunked_token_logprobs(h, weight, mb.resp.flatten(), tau).view(mask.shape)  # (B, Tr)
    # past a row's end the log-ratios are 0: exp() of an untrained padding position could
    # overflow, and inf * mask 0 is NaN in the gradient
    old_logp, ref_logp = (torch.where(mask == 0, logp.detach(), other)
                          for other in (mb.old_logp, mb.ref_logp))
    adv = mb.adv if mb.adv.dim() == 2 else mb.adv[:, None]  # (B, Tr) under rlsd, else (B, 1)
    l_out, clip_active = clipped_surrogate(logp, old_logp, adv, args.clip_low, args.clip_high,
                                           args.dual_clip)
    l_ref = ref_penalty(logp, ref_logp, args.kl_mode)
    # by name: per_token, each term times its weight (B, Tr); terms, their token-means (scalars);
    # metrics, unweighted (B, Tr), summed over this rank's response tokens
    per_token = {"out": l_out} if args.algo != "distill" else {}  # distill: no verifier term
    per_token["ref"] = args.alpha * l_ref
    metrics = {}
    if args.algo in ("sdpg", "distill"):  # each view its own weights; no gradient to the teacher
        kl = fused_reverse_kl(h, mb.h_teacher.flatten(0, 1), weight, tau,
                              teacher_weight=mb.w_teacher).view(mask.shape)  # (B, Tr)
        # min(KL, cap) per token, no gradient where capped (dp_actor.py:632)
        kl_used = torch.clamp(kl, max=args.kl_cap) if args.kl_cap > 0 else kl
        if args.opd_exclude_eot:  # (core_algos.py:213-229, 299-300)
            kl_used = kl_used * ~mb.is_eot
        gated = args.algo == "sdpg" and args.opd_gate == "positive"  # distill reads no advantage
        gate = (adv > 0).float().expand_as(kl) if gated else torch.ones_like(kl)
        per_token["opd"] = beta_k * gate * kl_used
        metrics = {"loss_opd": gate * kl_used, "kl_teacher": kl}
    # token-mean over the global mini-batch: the sum over this rank's response tokens over those
    # of all ranks, times world_size because DDP averages the gradients over ranks
    terms = {name: (v * mask).sum() * world_size / n_tokens for name, v in per_token.items()}
    with torch.no_grad():
        log_w = logp - ref_logp
        metrics.update(loss=sum(per_token.values()), loss_out=l_out, loss_ref=l_ref,
                       kl_ref_k3=torch.exp(-log_w) - 1 + log_w,  # k3's estimate of KL(pi || pi_ref)
                       entropy=chunked_entropy(h, weight, tau).view(mask.shape),
                       clip_frac=clip_active.float())
        sums = {name: (v.detach() * mask).sum() for name, v in metrics.items()}
    return sum(terms.values()), sums, terms

# ---- config: every flag in one block; --help shows the value each recipe sets -------------------

# What --recipe sets, unless the flag is typed; --algo grpo and rlsd use their own row, as their
# official scripts do. T_warm, T_decay: fractions of T (--rl_steps), as the paper's 50, 350 of 400.
RECIPE_FLAGS = ("opd_gate", "beta_warmup", "beta_decay", "clip_low", "clip_high", "dual_clip",
                "kl_cap", "alpha", "kl_in_reward")
RECIPES = {  # gate   T_warm/T T_decay/T eps_low eps_high dual_clip kl_cap alpha kl_in_reward
    "paper":   ("positive", 1 / 8, 7 / 8,    0.2,    0.2,     10.0,     20.0,  1e-3, 0.0),
    "release": ("all",      0.0,   0.0,      0.2,    0.28,    10.0,     20.0,  1e-3, 0.0),
    "grpo":    ("all",      0.0,   0.0,      0.2,    0.2,     1000.0,   20.0,  0.0,  1e-3),
    "rlsd":    ("all",      0.0,   0.0,      0.2,    0.2,     3.0,      20.0,  0.0,  0.0)}
# paper: section 4.1 (gate, triangle, clip 0.2/0.2), dual clip and cap as released. release:
#   run_qwen3_4b_sdpg_boxed.sh:42-48 (beta, alpha, no schedule, no gate), :60-61 (clip), :152 (dual
#   clip), the cap dp_actor.py:632. grpo: run_qwen3_4b_grpo_original_boxed.sh:35-43 (dual clip 1000:
#   none; no L_ref; a k1 reward penalty). rlsd: run_qwen3_4b_rlsd_boxed.sh, actor.yaml:36-42, 112.
SFT_LR, SFT_HINT_FRAC, WEIGHT_DECAY = 1e-3, 0.5, 0.1  # warm start: half the problems show c
VAL_SIZE = 1000  # the warm start's validation problems: resolves its bar to about +-0.01
MAX_BAD_STEPS = 3  # stop after this many RL steps in a row with a non-finite update
EMA_RATE = 0.05  # --teacher ema, after each update: teacher += 0.05 (model - teacher), as SDPO

def recipe_help(name, what):  # '<what>; paper 0.2, release 0.28, grpo 0.2, rlsd 0.2'
    i = RECIPE_FLAGS.index(name)
    return f"{what}; " + ", ".join(f"{r} {row[i]:g}" if type(row[i]) is float else f"{r} {row[i]}"
                                   for r, row in RECIPES.items())

def number(kind, lo, hi=math.inf, above=False):  # an argparse type: a finite number in [lo, hi]
    def parse(text):
        v = kind(text)
        if not (lo < v if above else lo <= v) or v > hi or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text} is not in {'(' if above else '['}{lo}, {hi}]")
        return v
    return parse

# the model's size has a ceiling so that a typo is one line, not an allocation that never ends
count, share, nonneg = number(int, 0, 10 ** 9), number(float, 0, 1), number(float, 0, 1e9)
positive, size, batch = number(float, 0, 1e9, above=True), number(int, 1, 4096), number(int, 1, 1e5)
parser = argparse.ArgumentParser(description="SDPG on a toy addition task")
add = parser.add_argument
add("--out_dir", default="out", help="sft.pt, ckpt.pt and log.jsonl go here")
add("--resume", default="", help="continue the run saved in this ckpt.pt, with its flags")
add("--eval_every", type=count, default=50, help="RL steps between evaluations (0: start, end)")
add("--eval_size", type=number(int, 1, 10 ** 6), default=1000, help="held-out problems")
add("--eval_samples", type=number(int, 0, 4096), default=4, help="n of mean@n, per problem")
add("--seed", type=number(int, 0, 2 ** 32 - 1), default=0, help="the model, data and sampling")
add("--device", default="auto", help="auto | cpu | cuda | cuda:N")
add("--dtype", default=None, choices=["float32", "bfloat16"],
    help="autocast; default bf16 on a GPU that has it, else fp32")
add("--compile", action="store_true", help="torch.compile the RL training forward")
add("--digits", type=number(int, 1, 6), default=2, help="operand digits of the addition task")
add("--n_layer", type=size, default=4, help="transformer blocks")
add("--n_head", type=size, default=4, help="attention heads")
add("--n_embd", type=size, default=128, help="width, a multiple of --n_head")
# stage 1: the supervised warm start of both views
add("--sft_steps", type=count, default=2000, help="most warm-start steps (0 skips the stage)")
add("--sft_batch", type=batch, default=64, help="problems per warm-start step")
add("--sft_until", type=share, default=0.2, help="stop once the student solves this (0: never)")
add("--sft_teacher_until", type=share, default=0.9, help="... and the teacher view this")
# stage 2: RL
add("--rl_steps", type=count, default=300, help="RL steps T (rollout batches)")
add("--algo", default="sdpg", choices=["sdpg", "grpo", "rlsd", "distill"],
    help="the method; distill: L_OPD and L_ref alone, no verifier")
add("--prompts_per_step", type=batch, default=32, help="prompts a step, all ranks")
add("--group_size", type=number(int, 2, 4096), default=8, help="G, responses sampled per prompt")
add("--num_minibatches", type=size, default=2, help="updates per rollout batch")
add("--lr", type=positive, default=1e-4, help="RL AdamW learning rate")
add("--grad_clip", type=nonneg, default=1.0, help="max global grad norm, both stages (0 off)")
add("--temperature", type=positive, default=1.0, help="of the rollouts and of every log-prob")
add("--max_new_tokens", type=size, default=8, help="longest response")
add("--beta", type=nonneg, default=0.05, help="the peak weight of the distillation term")
add("--kl_mode", default="urkl", choices=["urkl", "ufkl", "rkl", "fkl"], help="anchor L_ref's form")
add("--teacher", default="current", choices=["current", "frozen", "ema"], help="teacher weights")
add("--opd_exclude_eot", action="store_true", help="no distillation on end-of-text tokens")
add("--recipe", default="paper", choices=["paper", "release"], help="the 9 below (sdpg, distill)")
add("--opd_gate", choices=["positive", "all"], help=recipe_help("opd_gate", "distil A > 0, or all"))
add("--beta_warmup", type=share, help=recipe_help("beta_warmup", "T_warm / T (0 off)"))
add("--beta_decay", type=share, help=recipe_help("beta_decay", "T_decay / T (0 off)"))
add("--clip_low", type=number(float, 0, 0.999), help=recipe_help("clip_low", "eps_low"))
add("--clip_high", type=nonneg, help=recipe_help("clip_high", "eps_high"))
add("--dual_clip", type=number(float, 1, 1e9, above=True),
    help=recipe_help("dual_clip", "the loss bound for A < 0, in -A units"))
add("--kl_cap", type=nonneg, help=recipe_help("kl_cap", "per-token cap of the KL (0 off)"))
add("--alpha", type=nonneg, help=recipe_help("alpha", "weight of L_ref"))
add("--kl_in_reward", type=nonneg, help=recipe_help("kl_in_reward", "k1 penalty in the reward"))

def resolve(args, horizon=None):
    """Fill each recipe flag left at None from its row of RECIPES. beta_horizon is the schedule's
    T: horizon, the T a resumed run ran with (main passes it unless --beta_warmup or --beta_decay
    is typed: the schedule then ends at the new --rl_steps), or else --rl_steps."""
    for name, value in zip(RECIPE_FLAGS, RECIPES[args.algo if args.algo in RECIPES else
                                                  args.recipe]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.beta_horizon = horizon or args.rl_steps
    return args

# ---- helpers of every phase: printing, errors, the all-reduce, the run's record -----------------

def print0(*a, **kw):  # print on rank 0 only (RANK is set by torchrun)
    if os.environ.get("RANK", "0") == "0":
        print(*a, **kw, flush=True)

def die(msg):  # one line on stderr (rank 0) and exit 2, never a traceback
    print0(f"sdpg.py: error: {msg}", file=sys.stderr)
    sys.exit(2)

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
    model: Any = None                  # pi_theta, unwrapped: every no-grad pass uses it
    train_model: Any = None            # model under DDP and compile: the gradient passes
    wrap: Any = None                   # wrap(model): under DDP when there are several ranks
    ref_model: Any = None              # pi_ref, the frozen warm start
    teacher_model: Any = None          # the weights that read c: model, ref_model or an EMA
    optimizer: Any = None
    rl_rng: Any = None                 # numpy Generator: problems, random contexts
    gen: Any = None                    # torch Generator: rollout sampling
    stop: Any = None                   # StopRequest: Ctrl-C or SIGTERM
    stopped: bool = False              # ... ended RL before its last step
    bad_streak: int = 0                # RL steps in a row with a non-finite update
    t_run: float = 0.0                 # time.time() when RL began

# ---- stage 1: the supervised warm start of both views, cached in sft.pt -------------------------

def warm_start(run, train_model, stop):
    """Cross-entropy on the reference answers, half the problems shown with c, until the student
    view solves --sft_until of a validation set and the teacher view --sft_teacher_until, or
    --sft_steps. Returns (finished, val): val the accuracies if short. The check comes every 10
    steps and, once the student is halfway to its bar, every step (it gains a point a step)."""
    args, model = run.args, run.model
    opt = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=WEIGHT_DECAY)
    rng, t_start, next_check = np.random.default_rng([args.seed, run.rank, 0]), time.time(), 10
    val_set = run.task.sample(np.random.default_rng([args.seed, 2]), VAL_SIZE)  # not the eval set
    for step in range(1, args.sft_steps + 1):
        x, y = (torch.tensor(v, device=run.device) for v in sft_batch(
            run.enc, run.task, rng, args.sft_batch // run.world_size, SFT_HINT_FRAC))
        check_fits(run, x.size(1), "a warm-start row c + x + y")
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
            loss_avg, now = all_sum(loss.detach().clone()).item() / run.world_size, time.time()
            print0(f"sft {step}/{args.sft_steps} | loss {loss_avg:.4f} | {now - t_start:.0f}s")
            run.log({"phase": "sft", "step": step, "loss": loss_avg, "time": now - t_start})
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

# ---- evaluation: greedy accuracy of both views, and mean@n of the student -----------------------

CONTEXT_SEED = 4321  # draws the held-out contexts that involve chance: the same every time

def generate_padded(run, model, rows, n=1, temperature=0.0, gen=None):  # rows: token lists
    check_fits(run, max(map(len, rows)) + run.args.max_new_tokens, "a prompt and its response")
    x, n_pad = left_pad(rows, run.enc.eot_token, run.device)  # -> n responses each, their masks
    with run.ctx:
        return model.generate(x, run.args.max_new_tokens, run.enc.eot_token, n, temperature, gen,
                              n_pad=n_pad)

@torch.no_grad()
def evaluate(run, model, problems, views=("student", "teacher")):
    """Greedy accuracy of model's student view (x) and teacher view (c + x), of those in views
    (None for the other); each rank counts its shard problems[rank::world_size], summed."""
    mine = problems[run.rank::run.world_size]
    prompts = encode_batch(run.enc, run.task, problems, np.random.default_rng(CONTEXT_SEED))[:2]
    correct = torch.tensor([0.0, 0.0, len(mine)], device=run.device)  # student, teacher, problems
    for i, view in enumerate(("student", "teacher")):
        if mine and view in views:
            resp, _ = generate_padded(run, model, prompts[i][run.rank::run.world_size])
            correct[i] = sum(verify(run.enc, run.task, resp, mine))
    s, t, m = all_sum(correct).tolist()  # correct by the student, by the teacher; problems
    return tuple(v / m if view in views else None for v, view in ((s, "student"), (t, "teacher")))

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
    args, problems = run.args, run.task.eval_set
    rec = dict(zip(("phase", "step", "eval_acc", "teacher_acc"),
                   ("eval", k, *evaluate(run, run.model, problems))))
    if args.teacher != "current":  # teacher_acc: the weights distilled from; the model's view too
        rec["current_teacher_acc"] = rec["teacher_acc"]
        rec["teacher_acc"] = evaluate(run, run.teacher_model, problems, ("teacher",))[1]
    if args.eval_samples:
        rec[f"mean@{args.eval_samples}"], rec[f"mean@{args.eval_samples}_ci95"] = mean_at_n(
            run, problems, args.eval_samples)
    print0(f"eval step {k}/{args.rl_steps} | " + " | ".join(f"{name} {v:.3f}" for name, v in
                                                            list(rec.items())[2:]))
    run.log(rec)
    return rec

# ---- stage 2: one RL step in four phases: rollouts, scoring, updates, the step's record ---------

def sample_rollouts(run, n_prompts):
    """Phase 1: problems, G responses to each from the student view (which never holds c), and
    the verifier's rewards. Rollouts of B = n_prompts * G rows, Tr the longest response."""
    G = run.args.group_size
    problems = run.task.sample(run.rl_rng, n_prompts)
    x_rows, cx_rows, _ = encode_batch(run.enc, run.task, problems, run.rl_rng)  # draws contexts
    check_fits(run, max(map(len, cx_rows)) + run.args.max_new_tokens, "a prompt c + x and y")
    resp, mask = generate_padded(run, run.model, x_rows, G, run.args.temperature, run.gen)
    rewards = torch.tensor(verify(run.enc, run.task, resp, problems, G), device=run.device)
    (x, x_pad), (cx, cx_pad) = (left_pad(rows, run.enc.eot_token, run.device)
                                for rows in (x_rows, cx_rows))
    x, cx, x_pad, cx_pad = (None if v is None else v.repeat_interleave(G, 0)  # per rollout
                            for v in (x, cx, x_pad, cx_pad))
    return Rollouts(problems, x, cx, resp, mask, resp == run.enc.eot_token, rewards, x_pad, cx_pad)

def score_rollouts(run, batch, k):
    """Phase 2, filling batch.old_logp, ref_logp (B, Tr) and adv (B,): log pi_old(y_t), log
    pi_ref(y_t), each prompt read once for its G rows; group-relative advantages (official GRPO's
    of the reward less its KL penalty; rlsd's (B, Tr), ray_trainer.py:1632)."""
    args, G, tau = run.args, run.args.group_size, run.args.temperature
    with torch.no_grad(), run.ctx:
        x, x_pad = batch.x[::G], per_prompt(batch.x_pad, G)  # (B/G, Tp), (B/G,)
        batch.old_logp = run.model.token_logprobs(x, batch.resp, G, tau, x_pad)  # (B, Tr)
        batch.ref_logp = run.ref_model.token_logprobs(x, batch.resp, G, tau, x_pad)
        if args.algo == "rlsd":
            teacher_logp = run.teacher_model.token_logprobs(batch.cx[::G], batch.resp, G, tau,
                                                            per_prompt(batch.cx_pad, G))
    penalised = kl_in_reward_scores(batch.rewards, batch.old_logp, batch.ref_logp, batch.mask,
                                    args.kl_in_reward) if args.kl_in_reward else batch.rewards
    batch.adv = group_advantages(penalised, G)
    if args.algo == "rlsd":
        batch.adv = rlsd_advantages(batch.adv, teacher_logp, batch.old_logp, rlsd_lambda(k))

def update(run, batch, beta_k, k, hook):
    """Phase 3: --num_minibatches AdamW steps on slices of whole groups: the teacher's hidden
    states (no gradient), the loss, backward, and the step unless the gradient is not finite.
    Returns the metric sums by name, the skipped updates, the hook's fields and its seconds."""
    args, G = run.args, run.args.group_size
    rows = len(batch.resp) // args.num_minibatches  # rollouts per mini-batch on this rank
    # response tokens of each global mini-batch, one all-reduce for all (every rank calls it)
    n_tokens = all_sum(batch.mask.reshape(args.num_minibatches, rows, -1).sum((1, 2))).tolist()
    sums, skipped, extra, dt_hook = {}, 0, {}, 0.0
    for j in range(args.num_minibatches):
        mb = batch.rows(j * rows, (j + 1) * rows, G)
        if args.algo in ("sdpg", "distill"):  # the teacher reads c + x + y, c + x once a prompt
            with torch.no_grad(), run.ctx:
                # Row (b, t) of h_teacher predicts resp[b, t], as the student's row in
                # minibatch_loss does: for 7 + 96 (x = "07+96=", 6 tokens; c + x, 11; y = "301"
                # <eot>) the student reads position 5 + t of x + y, the teacher 10 + t of c + x + y
                mb.h_teacher = run.teacher_model.shared_prefix_hidden(
                    mb.cx[::G], mb.resp, G, per_prompt(mb.cx_pad, G))  # (B, Tr, H)
            mb.w_teacher = run.teacher_model.lm_head_weight.detach()  # (V, H): its own head
        if hook is not None and j == 0:
            t_hook = time.perf_counter()
            extra = hook(run, k, beta_k, mb) or {}
            dt_hook = time.perf_counter() - t_hook
        with run.ctx:
            loss, mb_sums, _ = minibatch_loss(run.train_model, run.model.lm_head_weight, mb,
                                              n_tokens[j], args, beta_k, run.world_size)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the norm is of the gradients DDP already averaged, so every rank takes the same branch
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                                         args.grad_clip or math.inf)):
            run.optimizer.step()
            if args.teacher == "ema":  # the teacher's weights follow the model's, trunk and head
                with torch.no_grad():
                    for ema, weight in zip(run.teacher_model.parameters(), run.model.parameters()):
                        ema.lerp_(weight, EMA_RATE)
        else:  # a non-finite loss or gradient: skip, keep the weights and Adam's moments
            skipped += 1
        sums = {name: sums.get(name, 0) + v for name, v in mb_sums.items()}
    return sums, skipped, extra, dt_hook

def step_record(run, k, batch, sums, beta_k, dt, skipped, extra, dt_hook=None):
    """Phase 4: log the step over all ranks: token terms per response token, the reward per
    rollout, signal_frac the groups whose rewards differ (A = 0 elsewhere, unless kl_in_reward)."""
    G, rewards = run.args.group_size, batch.rewards.view(-1, run.args.group_size)  # (B/G, G)
    totals = {**sums, "signal": (rewards.amax(1) != rewards.amin(1)).sum(),
              "reward": batch.rewards.sum(), "tokens": batch.mask.sum(),
              "rollouts": torch.tensor(float(len(batch.rewards)))}
    summed = all_sum(torch.stack([v.float().to(run.device) for v in totals.values()])).tolist()
    totals = dict(zip(totals, summed))
    rec = {"phase": "rl", "step": k, "reward": totals["reward"] / totals["rollouts"],
           "signal_frac": totals["signal"] * G / totals["rollouts"],
           "resp_len": totals["tokens"] / totals["rollouts"],
           **{name: totals[name] / totals["tokens"] for name in sums}, "beta_k": beta_k,
           **({"rlsd_lambda": rlsd_lambda(k)} if run.args.algo == "rlsd" else {}),
           "tok_per_s": totals["tokens"] / dt, "dt": dt, "skipped": skipped,
           **({} if dt_hook is None else {"dt_hook": dt_hook})}
    if set(rec) & set(extra):  # a hook adds fields, never replaces the step's own (every rank)
        die_all(f"the hook returned {', '.join(sorted(set(rec) & set(extra)))}, which the step "
                f"logs itself: rename them", run)
    rec.update(extra)
    print0(f"step {k}/{run.args.rl_steps} | " + " | ".join(f"{name} {v:.4g}" for name, v in
                                                         list(rec.items())[2:]))
    run.log(rec)

# ---- the run: setup, stage 1, stage 2 -----------------------------------------------------------

def setup(args, task, ckpt, stop):
    """The processes, the model sized for the task, the log, stage 1 (the warm start, or its cache
    in sft.pt), then pi_ref, the teacher's weights, AdamW and the RL streams: the Run."""
    rank, local_rank, world_size, device, use_cuda = setup_distributed(args)
    pick_dtype(args, use_cuda)  # bf16 autocast on a GPU that has it; the config logs the choice
    ctx = torch.autocast(device.type, torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    enc = get_encoding()
    model_args = model_size(args, task, enc, world_size)  # the block size fits the task
    if ckpt is not None:  # every check before the log is written
        check_resume(args, task, ckpt)
    run = Run(args, task, enc, device, ctx, rank, world_size, open_log(args, rank), stop=stop)
    run.log({"phase": "config", **vars(args), "task": repr(task), "world_size": world_size,
             "device": str(device), "torch": torch.__version__, "numpy": np.__version__,
             "python": sys.version.split()[0]})
    torch.manual_seed(args.seed)  # the same on every rank: the same initial weights
    run.model = model = GPT(GPTConfig(**model_args)).to(device)
    print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | "
           f"vocab {run.enc.n_vocab} | device {device} | world {world_size}")
    run.wrap = lambda module: DDP(module, device_ids=[local_rank] if use_cuda else None) \
        if dist.is_initialized() else module  # gradient passes: DDP averages gradients over ranks
    warm_start_cached(run, model_args, ckpt, stop)  # stage 1, or its cache in sft.pt
    run.ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # pi_ref
    run.teacher_model = model if args.teacher == "current" else run.ref_model if \
        args.teacher == "frozen" else copy.deepcopy(run.ref_model)  # ema: follows model (update)
    run.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    run.rl_rng = np.random.default_rng([args.seed, rank, 1])  # problems
    run.gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)  # sampling
    return run

def train(args, task, hook, ckpt, stop):
    """Both stages: setup, then RL from step 1 (or from ckpt, a checkpoint's contents); returns
    the Run. The extension point of tools/: hook(run, k, beta_k, mb), if given, sees each step's
    first mini-batch (Rollouts) before its update, on every rank, and returns a dict (or None)
    logged with the step as rank 0's hook returned it (a hook reduces over ranks itself). It
    changes nothing; a field the step logs itself is an error; its time is dt_hook, not dt."""
    run = setup(args, task, ckpt, stop)
    start, evals = resume(run, ckpt) if ckpt is not None else (0, [None, None])
    run.train_model = torch.compile(run.wrap(run.model)) if args.compile else run.wrap(run.model)
    if evals[1] is None:  # the first and the latest evaluation, for the summary and checkpoint
        evals[1] = run_eval(run, start)
        evals[0] = evals[0] or evals[1]
    run.t_run = time.time()
    for k in range(start + 1, args.rl_steps + 1):  # the official step numbering starts at 1
        t0 = time.perf_counter()
        # T: --rl_steps, or the T a resumed run started with (resolve); 0 without distillation
        beta_k = beta_schedule(k, args.beta_horizon, args.beta, args.beta_warmup,
                               args.beta_decay) if args.algo in ("sdpg", "distill") else 0.0
        batch = sample_rollouts(run, args.prompts_per_step // run.world_size)
        score_rollouts(run, batch, k)
        sums, skipped, extra, dt_hook = update(run, batch, beta_k, k, hook)
        if run.device.type == "cuda":
            torch.cuda.synchronize()  # for the step's time
        step_record(run, k, batch, sums, beta_k, time.perf_counter() - t0 - dt_hook, skipped,
                    extra, dt_hook if hook else None)
        if upkeep(run, k, skipped, evals):  # evaluation, checkpoint, non-finite streak, Ctrl-C
            break
    return finish(run, start, evals)

def main(argv=None, task=None, hook=None):
    """python sdpg.py [flags]: parse, check, train. Tools call it with a task or a hook. A resume
    takes every flag not typed from the run it continues; it restores the signal handlers."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    ckpt = read_resume(args.resume) if args.resume else None
    kept = ckpt and args.beta_warmup is None and args.beta_decay is None  # the schedule untyped
    if ckpt is not None:  # the run's own flags, then the typed ones, which win
        parser.error = lambda msg: die(f"--resume {args.resume}: its config: {msg}")
        args = parser.parse_args(saved_flags(ckpt["config"]) + argv)
        parser.error = die
    args = resolve(args, ckpt["config"]["beta_horizon"] if kept else None)
    try:
        task = task or AdditionTask(args.digits, args.eval_size)  # the task interface: data.py
    except ValueError as e:
        die(str(e))
    stop = StopRequest()  # Ctrl-C or SIGTERM: finish the step, save, exit
    try:
        return train(args, task, hook, ckpt, stop)
    finally:
        stop.restore()


# ======== What a first reading may skip: devices, processes, dtype and size checks, logging, ======
# signals, the warm-start cache, checkpoints and resume, the upkeep of the loop.

def setup_distributed(args):
    """One process per device under torchrun (nccl on CUDA, gloo on CPU), each on
    cuda:LOCAL_RANK; else one process. Returns (rank, local_rank, world_size, device, use_cuda)."""
    env = {k: int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0),
                                                      ("WORLD_SIZE", 1), ("LOCAL_WORLD_SIZE", 0))}
    ddp, local_rank = "RANK" in os.environ, env["LOCAL_RANK"]
    if not (args.device in ("auto", "cpu") or re.fullmatch(r"cuda(:[0-9]+)?", args.device)):
        die(f"--device {args.device}: use auto, cpu, cuda or cuda:N")
    use_cuda = args.device.startswith("cuda") or args.device == "auto" and torch.cuda.is_available()
    if use_cuda and not torch.cuda.is_available():
        die(f"--device {args.device}: CUDA is not available on this machine")
    device = torch.device("cpu")
    if use_cuda:
        gpus = torch.cuda.device_count()
        if ddp and args.device not in ("auto", "cuda"):
            die(f"--device {args.device} cannot be used under torchrun: each process takes "
                f"cuda:LOCAL_RANK (use --device cuda, and CUDA_VISIBLE_DEVICES to choose)")
        if ddp and max(env["LOCAL_WORLD_SIZE"], local_rank + 1) > gpus:  # every process checks
            die(f"torchrun started more processes on this node than it has GPUs ({gpus}): use "
                f"--nproc_per_node <= {gpus}, or --device cpu")
        device = torch.device(args.device if ":" in args.device else f"cuda:{local_rank}")
        if device.index >= gpus:
            die(f"--device {args.device}: the machine has {gpus} GPU(s), cuda:0 to cuda:{gpus - 1}")
        torch.cuda.set_device(device)  # before the process group, so that nccl binds this GPU
    if ddp:
        dist.init_process_group(**(dict(backend="nccl", device_id=device) if use_cuda else
                                   dict(backend="gloo")))
    return env["RANK"], local_rank, env["WORLD_SIZE"], device, use_cuda

def pick_dtype(args, use_cuda):  # bf16 autocast on a GPU that has it natively, else fp32
    native = use_cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if use_cuda and not native and args.dtype == "bfloat16":
        die_all("--dtype bfloat16: this GPU has no native bfloat16; use --dtype float32")
    if use_cuda and not native and args.dtype is None:
        print0("dtype: this GPU has no native bfloat16: float32 (--dtype float32 says so)")
    args.dtype = args.dtype or ("bfloat16" if native else "float32")

def model_size(args, task, enc, world_size):  # GPT's arguments, once the batches and answer fit
    # the held-out contexts as evaluation draws them (CONTEXT_SEED), so that evaluation fits
    _, cx_rows, target = encode_batch(enc, task, task.eval_set,
                                      np.random.default_rng(CONTEXT_SEED))
    if args.prompts_per_step % (world_size * args.num_minibatches) or args.sft_batch % world_size:
        die_all(f"--prompts_per_step {args.prompts_per_step} must split evenly over {world_size} "
                f"ranks x --num_minibatches {args.num_minibatches}, and --sft_batch over the ranks")
    if args.n_embd % args.n_head:
        die_all(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    if args.max_new_tokens < max(map(len, target)):
        die_all(f"--max_new_tokens must be >= {max(map(len, target))}: the answer and end-of-text")
    # the block size: the longest held-out teacher prompt c + x and --max_new_tokens after it
    return dict(block_size=max(map(len, cx_rows)) + args.max_new_tokens, n_layer=args.n_layer,
                vocab_size=enc.n_vocab, n_head=args.n_head, n_embd=args.n_embd)

def check_fits(run, length, what):  # one line if a sequence outgrows the block size
    if length > run.model.config.block_size:  # the rank that sees it says so; torchrun stops all
        print(f"sdpg.py: error: {run.task!r}: {what} of {length} tokens outgrows the block size "
              f"{run.model.config.block_size} (held-out c + x, --max_new_tokens)", file=sys.stderr)
        sys.exit(2)

def open_log(args, rank):  # log(record): a JSON line in log.jsonl from rank 0; resumes append
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        f = rank == 0 and open(os.path.join(args.out_dir, "log.jsonl"), "a" if args.resume else "w")
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
    """Ctrl-C or SIGTERM: finish the step, save, exit; one more 2 s later stops at once."""
    def __init__(self):
        self.requested, self.when = False, 0.0
        self.replaced = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    def restore(self):
        for sig, handler in self.replaced.items():
            signal.signal(sig, handler)
    def handle(self, signum, frame):
        if self.requested and time.time() - self.when > 2:
            raise KeyboardInterrupt
        self.requested, self.when = True, self.when or time.time()
    def any_rank(self, device):  # every rank calls it: under DDP an all-reduce and a host sync
        if not dist.is_initialized():
            return self.requested
        return all_sum(torch.tensor(float(self.requested), device=device)).item() > 0

def upkeep(run, k, skipped, evals):  # after step k, every rank; True: Ctrl-C or SIGTERM, stop
    args = run.args
    evaluated = (args.eval_every and k % args.eval_every == 0) or k == args.rl_steps
    if evaluated:
        evals[1] = run_eval(run, k)
        save_checkpoint(run, k, True, evals)
    run.bad_streak = run.bad_streak + 1 if skipped else 0
    if run.bad_streak >= MAX_BAD_STEPS:  # the last checkpoint is kept
        die_all(f"{run.bad_streak} steps in a row had non-finite gradients; try a lower --lr", run)
    run.stopped = run.stop.any_rank(run.device)
    if run.stopped:  # saved now unless just saved with its evaluation
        if not evaluated:
            save_checkpoint(run, k, False, evals)
        print0(f"interrupted: stopped after step {k}/{args.rl_steps}; continue with --resume "
               f"{os.path.join(args.out_dir, 'ckpt.pt')}")
    return run.stopped

def finish(run, start, evals):  # the summary line; every rank leaves the process group
    if start == run.args.rl_steps:  # resumed at its last step: nothing ran, the checkpoint stays
        save_checkpoint(run, start, True, evals)
    acc = " | ".join(f"{v} {evals[0][v]:.3f} (step {evals[0]['step']}) -> {evals[1][v]:.3f} "
                     f"(step {evals[1]['step']})" for v in ("eval_acc", "teacher_acc"))
    out = run.args.out_dir
    print0(f"{'stopped' if run.stopped else 'done'}: RL {time.time() - run.t_run:.0f}s | {acc} | "
           f"files in {out}/ | curves: python tools/plot.py {out}/log.jsonl")
    teardown(run)
    return run

def warm_start_cached(run, model_args, ckpt, stop):  # stage 1, or its cache in sft.pt
    args, model = run.args, run.model
    path, key = os.path.join(args.out_dir, "sft.pt"), sft_key(run, model_args)
    cached, val = {}, None  # sft.pt is reused if readable and made from every input of stage 1
    try:
        cached = load_checkpoint(path, dict(model=dict, key=dict)) if ckpt is None and \
            os.path.exists(path) else {}
    except ValueError as e:
        print0(f"warm start: ignoring {e}")
    if cached.get("key") == key:
        model.load_state_dict(cached["model"])
        print0(f"warm start: reusing {path}")
        val = cached.get("val")
    elif ckpt is None and args.sft_steps > 0:
        finished, val = warm_start(run, run.wrap(model), stop)
        if not finished:  # interrupted
            teardown(run)
            raise SystemExit(130)
        save_or_stop(run, lambda: {"model": model.state_dict(), "key": key, "val": val}, path)
    if val:  # below its bars, now or when it ran: say and log that RL starts from a weaker model
        print0(f"warm start: {args.sft_steps} steps did not reach the bars (student {val[0]:.3f} "
               f"of {args.sft_until}, teacher {val[1]:.3f} of {args.sft_teacher_until})")
        run.log({"phase": "sft", "reached": False, "val_acc": val[0], "val_teacher_acc": val[1]})

def sft_key(run, model_args):  # every input of stage 1: sft.pt is reused only if all are equal
    return dict({k: getattr(run.args, k) for k in ("seed", "sft_steps", "sft_batch", "sft_until",
                "sft_teacher_until", "grad_clip", "max_new_tokens", "dtype")}, task=repr(run.task),
                tokenizer=run.enc.name, model_args=model_args, world_size=run.world_size,
                device=run.device.type, sft_lr=SFT_LR, hint_frac=SFT_HINT_FRAC,
                weight_decay=WEIGHT_DECAY, val_size=VAL_SIZE)

def save_atomic(obj, path):  # to path.tmp, then renamed: a kill mid-save keeps the old file
    try:
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    finally:
        if os.path.isfile(path + ".tmp"):
            os.remove(path + ".tmp")

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

CKPT_FORMAT = 2  # 2: T_warm and T_decay in fractions of T (1, earlier: in steps)

def save_checkpoint(run, step, evaluated, evals):  # every rank calls it
    rngs = [{"numpy": run.rl_rng.bit_generator.state, "torch_gen": run.gen.get_state(),
             "torch": torch.get_rng_state(), "device": run.gen.device.type}] * run.world_size
    if dist.is_initialized():
        dist.all_gather_object(rngs, rngs[0])
    save_or_stop(run, lambda: dict(
        model=run.model.state_dict(), ref_model=run.ref_model.state_dict(), rng=rngs, step=step,
        optimizer=run.optimizer.state_dict(), model_args=vars(run.model.config),
        config=vars(run.args), task=repr(run.task), evaluated=evaluated, evals=evals,
        teacher_model=run.teacher_model.state_dict() if run.args.teacher == "ema" else {},
        format=CKPT_FORMAT), os.path.join(run.args.out_dir, "ckpt.pt"))

def load_checkpoint(path, types):
    """torch.load, weights_only (no pickled code runs), each field of types checked; else a
    one-line ValueError: unreadable, truncated, not ours, or a field missing or bad."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the file is: one line, never a traceback
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") \
            from None
    bad = [k for k, t in types.items() if not isinstance(ckpt, dict) or not isinstance(
        ckpt.get(k), t) or isinstance(ckpt[k], bool) or (t is int and ckpt[k] < 0)]
    if bad:
        raise ValueError(f"{path}: not an SDPG checkpoint (no valid {', '.join(bad)})")
    return ckpt

def read_resume(path):  # the checkpoint --resume names, its fields and its format checked
    try:
        ckpt = load_checkpoint(path, dict(model=dict, ref_model=dict, optimizer=dict, step=int,
                                          model_args=dict, config=dict, rng=list))
    except ValueError as e:
        die(f"--resume {e}" if os.path.isfile(path) else f"--resume {path}: no such file")
    if ckpt.get("format") != CKPT_FORMAT or type(ckpt["config"].get("beta_horizon")) is not int:
        die(f"--resume {path}: format {ckpt.get('format', 1)}, this sdpg.py's is {CKPT_FORMAT}")
    return ckpt

def saved_flags(config):  # a checkpoint's config as flags (main parses them as if typed)
    flags = []
    for action in parser._actions[1:]:  # [0] is --help
        value = config.get(action.dest)
        if action.dest != "resume" and value is not None and value is not False:
            flags += action.option_strings[:1] + ([] if value is True else [str(value)])
    return flags

# a resumed run continues the same algorithm: these flags must equal the checkpoint's
SAME_ON_RESUME = ("algo", "recipe", "beta", "alpha", "clip_low", "clip_high", "dual_clip",
                  "opd_gate", "kl_cap", "opd_exclude_eot", "kl_in_reward", "kl_mode", "teacher",
                  "group_size", "prompts_per_step", "num_minibatches", "temperature", "lr",
                  "grad_clip", "max_new_tokens", "seed", "dtype", "n_layer", "n_head", "n_embd")

def check_resume(args, task, ckpt):  # one line for a resume that changes the run
    for name in (k for k in SAME_ON_RESUME if ckpt["config"].get(k) != getattr(args, k)):
        die_all(f"--resume: --{name} {getattr(args, name)} differs from the run it continues "
                f"({ckpt['config'].get(name)}); a resumed run keeps its algorithm")
    if ckpt["step"] > args.rl_steps or ckpt.get("task", repr(task)) != repr(task):
        die_all(f"--resume: the checkpoint (step {ckpt['step']} of {ckpt.get('task')}) cannot "
                f"continue as --rl_steps {args.rl_steps} of {task!r}")

def resume(run, ckpt):
    """Load ckpt into the models, Adam and (if they fit) the random streams; log what typed flags
    changed and the schedule in steps. Returns (step, [first, latest evaluation record])."""
    path, config, args = run.args.resume, ckpt["config"], run.args
    parts = dict(model=run.model, ref_model=run.ref_model, optimizer=run.optimizer)
    if args.teacher == "ema":  # the EMA teacher's own weights
        parts["teacher_model"] = run.teacher_model
    try:
        for name, part in parts.items():
            part.load_state_dict(ckpt[name])
    except Exception as e:  # shapes, names, Adam's state: one line
        die_all(f"--resume {path}: its weights do not fit the model ({type(e).__name__})")
    try:  # this rank's streams, set on new ones: the run keeps its fresh streams unless all fit
        s, rl_rng, gen = ckpt["rng"][run.rank], np.random.default_rng(), torch.Generator(run.device)
        if len(ckpt["rng"]) != run.world_size or s["device"] != run.device.type:
            raise ValueError(f"saved with {len(ckpt['rng'])} ranks on {s['device']}, running "
                             f"{run.world_size} on {run.device.type}")
        rl_rng.bit_generator.state = s["numpy"]
        gen.set_state(s["torch_gen"])
        torch.set_rng_state(s["torch"])  # last: nothing is set unless every state fits
        run.rl_rng, run.gen = rl_rng, gen
    except Exception as e:  # another world, or states that do not fit their device
        print0(f"resume: its streams do not fit ({e!s:.100}): new streams")
    changed = {k: [config.get(k), v] for k, v in vars(args).items()
               if k != "resume" and config.get(k) != v}
    T = args.beta_horizon
    schedule = dict(warmup=args.beta_warmup * T, decay=args.beta_decay * T, horizon=T)  # steps
    note = f"beta keeps the schedule it ran with, which ends at step {T} (a typed --beta_warmup " \
        f"or --beta_decay sets one for --rl_steps)" if T != args.rl_steps else \
        f"the schedule ends at step {T}"
    print0(f"resumed from {path} at step {ckpt['step']}" + "".join(
        f" | {k} {old} -> {new}" for k, (old, new) in changed.items()) +
        (f" | {note}" if args.algo in ("sdpg", "distill") else ""))
    run.log({"phase": "resume", "step": ckpt["step"], "from": path, "changed": changed,
             "schedule": schedule})
    evals = ckpt.get("evals")  # [first, latest] evaluation records, checked as every field
    ok = isinstance(evals, list) and len(evals) == 2 and all(
        isinstance(e, dict) and {"step", "eval_acc", "teacher_acc"} <= set(e) for e in evals)
    return ckpt["step"], [evals[0], evals[1] if ckpt.get("evaluated") is True else None] \
        if ok else [None, None]


parser.error = die  # argparse's own errors (unknown flag, bad choice) are one line too

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C: at once, without saving
        print0("sdpg.py: interrupted twice: stopped at once; the last checkpoint is kept")
        sys.exit(130)
