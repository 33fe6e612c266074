"""
Self-Distilled Policy Gradient (SDPG, arXiv 2606.04036) in one file of plain PyTorch.

One model pi_theta, two views: the student p_t = pi_theta(.|x, y_<t) sees the problem x, the
teacher q_t = pi_theta(.|c, x, y_<t) also a privileged context c (here the answer). Rollouts y
come from the student. At RL step k = 1..T the loss, a token-mean over the response tokens, adds
on-policy distillation (OPD: the student pulled toward the teacher on its own rollouts) to PPO:

    L = L_out + beta(k) * L_OPD + alpha * L_ref
    L_out  = max(-A r_t, -A clip(r_t, 1-eps_low, 1+eps_high)), at most -A*dual_clip when A < 0
             r_t = pi_theta(y_t) / pi_old(y_t),  A_i = (R_i - mean_G R) / (std_G R + eps)
    L_OPD  = [A_i > 0] * min(20, sum_a p_t(a) (log p_t(a) - log SG q_t(a)))   over every token a
    L_ref  = 0.5 * (log pi_theta(y_t) - log pi_ref(y_t))^2        (urkl; ufkl, rkl, fkl too)
    beta(k) = beta * min(1, k / T_warm) * min(1, max(0, T - k) / T_decay)

Stage 1, a supervised warm start standing in for pretraining, teaches both views; stage 2 is RL
under --recipe paper (the gate [A_i > 0], a beta triangle, clip 0.2/0.2) or release (no gate,
constant beta, clip 0.2/0.28): RECIPES below. A typed flag wins; log.jsonl holds what ran.
    python sdpg.py                                    # CPU, or one GPU when there is one
    torchrun --standalone --nproc_per_node=2 sdpg.py  # DDP: a process per GPU (gloo on CPU)

Deliberate choices (official code: github.com/yifanzhang-pro/SDPG at 0c818c0; core_algos.py and
ray_trainer.py in verl/trainer/ppo/, dp_actor.py in verl/workers/actor/, examples/rpg2_trainer/):
 1. The teacher is the teacher view (c + x) of the weights --teacher names: by default the
    current model, recomputed without gradient in every mini-batch, as the official code does;
    frozen: pi_ref (head included); ema: an EMA of the model. teacher_acc logs this teacher.
 2. pi_ref is a frozen copy of the warm start; pi_old, the weights that sampled, gives r_t.
 3. Every term is a token-mean over the response tokens of the global mini-batch (all ranks);
    gated-out rollouts count with zero loss. (Official: per micro-batch, close at LLM scale.)
 4. The temperature divides both views' logits (official: the student's only, and a bf16
    teacher; here the KL is fp32). The same at temperature 1.
 5. Steps count from 1, as the official trainer's: beta(1) = beta / T_warm; beta(T) = 0 with
    the decay on. The reward is 1/0 (official +1/-1: the same advantages unless kl_in_reward).
 6. Baselines as their official scripts: --algo grpo (clip 0.2/0.2, no dual clip, no L_ref, a
    k1 penalty in the reward) and rlsd (the teacher reweights the advantage per token). --algo
    distill is L_OPD and L_ref without L_out (no official script); --beta 0 is SDPG without it.
 7. Not ported: the released lr warm-up, DAPO dynamic sampling (set, never read by the trainer).
 8. The exact KL runs the head in chunks with its closed-form backward (model.fused_reverse_kl;
    full_vocab_reverse_kl below is the definition it is tested against).
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
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import AdditionTask, encode_batch, get_encoding, left_pad, sft_batch, verify
from model import GPT, GPTConfig, chunked_entropy, chunked_token_logprobs, fused_reverse_kl
from model import response_hidden

# ---- the terms of the loss, one function each ---------------------------------------------------

def group_advantages(rewards, group_size, eps=1e-6):
    """A_i = (R_i - mean_G R) / (std_G R + eps), torch.std (unbiased), eps outside the root.
    rewards (N*G,), each group's G consecutive -> (N*G,). An all-equal group gets 0."""
    r = rewards.view(-1, group_size)  # (N, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)

RLSD_LAMBDA, RLSD_DECAY, RLSD_CLIP = 0.5, 50, 0.2  # lambda 0.5 -> 0 over 50 steps (core_algos.py)

def rlsd_advantages(adv, teacher_logp, old_logp, lam, clip=RLSD_CLIP):
    """RLSD (arXiv 2604.03128; core_algos.py:461-477): delta_t = SG(clamp(log q_t(y_t) -
    log pi_old(y_t), -20, 20)), w_t = clip(exp(sign(A) delta_t), 1 - clip, 1 + clip),
    A_t = (1 - lam) A + lam A w_t. adv (B,), teacher_logp, old_logp (B, Tr) -> (B, Tr)."""
    a = adv[:, None]
    delta = (teacher_logp - old_logp).detach().clamp(-20, 20)
    w = torch.exp(torch.sign(a) * delta).clamp(1 - clip, 1 + clip)
    return (1 - lam) * a + lam * a * w

def rlsd_lambda(k):
    return RLSD_LAMBDA * max(0.0, 1 - k / RLSD_DECAY)

def kl_in_reward_scores(rewards, old_logp, ref_logp, mask, coef):
    """Official GRPO's s_i = R_i - coef * sum_t (log pi_old(y_t) - log pi_ref(y_t)), k1 summed
    over the response (ray_trainer.py:91-97, core_algos.py:629). (B,), (B, Tr) x3 -> (B,)."""
    return rewards - coef * ((old_logp - ref_logp) * mask).sum(1)

def clipped_surrogate(logp, old_logp, adv, clip_low, clip_high, dual_clip):
    """PPO's clipped loss with a dual clip: l_t = max(-A r_t, -A clip(r_t, 1-clip_low,
    1+clip_high)), r_t = exp(logp - old_logp), and for A < 0 at most -A * dual_clip.
    (B, Tr) each, adv broadcast. Returns l (B, Tr) and a bool (B, Tr), True where a clip is
    active (there the token has no gradient)."""
    ratio = torch.exp(logp - old_logp)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(pg_loss1, pg_loss2)
    capped = (adv < 0) & (loss > -adv * dual_clip)  # the dual clip
    loss = torch.where(capped, -adv * dual_clip, loss)
    clip_active = (pg_loss2 > pg_loss1) | capped
    return loss, clip_active

def full_vocab_reverse_kl(student_logits, teacher_logits):
    """KL(p || SG q) = sum_a p(a) (log p(a) - log q(a)) over every vocabulary entry, in fp32 at
    least, the teacher a constant. (..., V) x2 -> (...). d/dz_s = p (log p - log q - KL)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logp = torch.log_softmax(student_logits.to(dtype), dim=-1)
    logq = torch.log_softmax(teacher_logits.detach().to(dtype), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)

def ref_penalty(logp, ref_logp, kl_mode):
    """The anchor to pi_ref on sampled tokens, log w = log pi_theta(y_t) - log pi_ref(y_t):
    urkl 0.5 (log w)^2, ufkl pi_ref/pi_theta + log w, rkl 0.5 (log w + 1)^2, fkl pi_ref/pi_theta.
    (B, Tr) x2 -> (B, Tr)."""
    log_w = logp - ref_logp
    if kl_mode == "urkl":
        return 0.5 * log_w ** 2
    if kl_mode == "ufkl":
        return torch.exp(-log_w) + log_w
    if kl_mode == "rkl":
        return 0.5 * (log_w + 1) ** 2
    if kl_mode == "fkl":
        return torch.exp(-log_w)
    raise ValueError(f"unknown kl mode {kl_mode!r}: use urkl, ufkl, rkl or fkl")

def beta_schedule(k, total_steps, beta, warmup, decay):
    """beta(k) = beta * min(1, k / T_warm) * min(1, max(0, T - k) / T_decay), k = 1 .. T
    counted from 1 (core_algos.py:191-210); T_warm = warmup * T, T_decay = decay * T (the flags
    are shares of T); 0 turns a ramp off."""
    up = min(1.0, k / (warmup * total_steps)) if warmup > 0 else 1.0
    down = min(1.0, max(0.0, (total_steps - k) / (decay * total_steps))) if decay > 0 else 1.0
    return beta * up * down

@dataclasses.dataclass
class Rollouts:
    """Phase 1 on this rank: B = prompts x G rows, a row a rollout, a problem's G consecutive
    (its prompts repeated on each row; the no-grad passes read every G-th)."""
    problems: list              # the task's problems, one per group of G rows
    x: torch.Tensor             # (B, Tp) student prompt x
    x_pad: Optional[torch.Tensor]   # (B,) x's left padding; None: every x of one length
    cx: torch.Tensor            # (B, Tc+Tp) teacher prompt c + x
    cx_pad: Optional[torch.Tensor]  # (B,) c + x's left padding; None: one length
    resp: torch.Tensor          # (B, Tr) sampled tokens; end-of-text after a row's end
    mask: torch.Tensor          # (B, Tr) 1.0 on response tokens up to the first eot, with it
    is_eot: torch.Tensor        # (B, Tr) True at end-of-text tokens
    rewards: torch.Tensor       # (B,) the verifier's

@dataclasses.dataclass
class Batch(Rollouts):
    """Phase 2: the rollouts with what the old and the reference weights say of them and their
    advantages. An update reads rows of it (whole groups) with the teacher's hidden states."""
    old_logp: torch.Tensor      # (B, Tr) log pi_old(y_t): the weights that sampled
    ref_logp: torch.Tensor      # (B, Tr) log pi_ref(y_t): the frozen warm start
    adv: torch.Tensor           # (B,) group-relative advantages; (B, Tr) under rlsd
    h_teacher: Optional[torch.Tensor] = None  # (B, Tr, H): h_teacher[b, t] predicts resp[b, t]
    w_teacher: Optional[torch.Tensor] = None  # (V, H): the teacher's output matrix

def minibatch_loss(model, weight, mb, n_tokens, args, beta_k, world_size):
    """One mini-batch's loss on this rank, scaled so that DDP's average over ranks is the
    token-mean over the global mini-batch. model: the student (maybe under DDP); weight: its
    output matrix (V, H); mb: a Batch of this rank's rows; n_tokens: the response tokens of all
    ranks' rows. Terms: sdpg out + ref + opd, grpo and rlsd out + ref, distill ref + opd
    ungated. Returns the loss, the logged values summed over this rank's response tokens, and
    the weighted terms by name."""
    tau = args.temperature
    mask = mb.mask  # (B, Tr) 1.0 on response tokens
    # h[b, t] predicts resp[b, t], as h_teacher[b, t] does (minibatch); through DDP
    h = response_hidden(model, mb.x, mb.resp, mb.x_pad).flatten(0, 1)  # (B*Tr, H)
    logp = chunked_token_logprobs(h, weight, mb.resp.flatten(), tau).view(mask.shape)  # (B, Tr)
    # past a row's end the log-ratios are 0: exp() of an untrained padding position could
    # overflow, and inf * mask 0 is NaN in the gradient
    old_logp = torch.where(mask == 0, logp.detach(), mb.old_logp)
    ref_logp = torch.where(mask == 0, logp.detach(), mb.ref_logp)
    adv = mb.adv
    if adv.dim() == 1:
        adv = adv[:, None]  # (B, 1); rlsd's is (B, Tr) already
    l_out, clip_active = clipped_surrogate(logp, old_logp, adv, args.clip_low,
                                           args.clip_high, args.dual_clip)
    l_ref = ref_penalty(logp, ref_logp, args.kl_mode)
    weighted = {"out": l_out, "ref": args.alpha * l_ref}  # each term times its weight (B, Tr)
    if args.algo == "distill":  # no verifier term
        del weighted["out"]
    logged = {}  # per token (B, Tr), unweighted: summed for the step's record
    if args.algo in ("sdpg", "distill"):  # each view its own weights; no gradient to the teacher
        h_t, w_t = mb.h_teacher.flatten(0, 1), mb.w_teacher  # (B*Tr, H), (V, H): the teacher's
        kl = fused_reverse_kl(h, h_t, weight, tau, teacher_weight=w_t).view(mask.shape)  # (B, Tr)
        kl_used = kl
        if args.kl_cap > 0:  # min(KL, cap) per token, no gradient where capped (dp_actor.py:632)
            kl_used = torch.clamp(kl, max=args.kl_cap)
        if args.opd_exclude_eot:  # no distillation on end-of-text (core_algos.py:213-229, 299)
            kl_used = kl_used * ~mb.is_eot
        gated = args.algo == "sdpg" and args.opd_gate == "positive"  # distill reads no advantage
        gate = (adv > 0).float().expand_as(kl) if gated else torch.ones_like(kl)  # [A_i > 0]
        weighted["opd"] = beta_k * gate * kl_used
        logged["loss_opd"] = gate * kl_used
        logged["kl_teacher"] = kl
    # the token-mean over the global mini-batch: the sum over this rank's response tokens over
    # the response tokens of all ranks, times world_size because DDP averages over ranks
    terms = {}
    for name, per_token in weighted.items():
        terms[name] = (per_token * mask).sum() * world_size / n_tokens
    with torch.no_grad():
        log_w = logp - ref_logp
        logged["loss"] = sum(weighted.values())
        logged["loss_out"] = l_out
        logged["loss_ref"] = l_ref
        logged["kl_ref_k3"] = torch.exp(-log_w) - 1 + log_w  # k3's estimate of KL(pi || pi_ref)
        logged["entropy"] = chunked_entropy(h, weight, tau).view(mask.shape)
        logged["clip_frac"] = clip_active.float()
        sums = {name: (per_token.detach() * mask).sum() for name, per_token in logged.items()}
    return sum(terms.values()), sums, terms

# ---- config: every flag in one block; --help shows the value each recipe sets -------------------

# What --recipe sets, unless the flag is typed; --algo grpo and rlsd use their own row, as their
# official scripts do. beta_warmup and beta_decay are T_warm and T_decay as shares of T.
RECIPES = {
    # section 4.1: the gate, the triangle (T_warm 50, T_decay 350 of 400), clip 0.2/0.2; the dual
    # clip and the KL cap, on which the paper is silent, as released
    "paper": dict(opd_gate="positive", beta_warmup=1 / 8, beta_decay=7 / 8, clip_low=0.2,
                  clip_high=0.2, dual_clip=10.0, kl_cap=20.0, alpha=1e-3, kl_in_reward=0.0),
    # run_qwen3_4b_sdpg_boxed.sh:42-48 (beta, alpha, no schedule, no gate), :60-61 (clip), :152
    # (dual clip); the cap dp_actor.py:632
    "release": dict(opd_gate="all", beta_warmup=0.0, beta_decay=0.0, clip_low=0.2,
                    clip_high=0.28, dual_clip=10.0, kl_cap=20.0, alpha=1e-3, kl_in_reward=0.0),
    # run_qwen3_4b_grpo_original_boxed.sh:35-43: no dual clip (1000), no L_ref, a k1 penalty
    "grpo": dict(opd_gate="all", beta_warmup=0.0, beta_decay=0.0, clip_low=0.2,
                 clip_high=0.2, dual_clip=1000.0, kl_cap=20.0, alpha=0.0, kl_in_reward=1e-3),
    # run_qwen3_4b_rlsd_boxed.sh, actor.yaml:36-42, 112
    "rlsd": dict(opd_gate="all", beta_warmup=0.0, beta_decay=0.0, clip_low=0.2,
                 clip_high=0.2, dual_clip=3.0, kl_cap=20.0, alpha=0.0, kl_in_reward=0.0)}
SFT_LR = 1e-3          # the warm start's AdamW learning rate
SFT_HINT_FRAC = 0.5    # the share of warm-start problems shown with c
WEIGHT_DECAY = 0.1     # AdamW's, both stages
VAL_SIZE = 1000        # the warm start's validation problems: its bar to about +-0.01
MAX_BAD_STEPS = 3      # stop after this many RL steps in a row with a non-finite update
EMA_RATE = 0.05        # --teacher ema, after each update: teacher += 0.05 (model - teacher)

def recipe_help(name, what):  # '<what>; paper 0.2, release 0.28, grpo 0.2, rlsd 0.2'
    shown = [f"{r} {v[name]:g}" if isinstance(v[name], float) else f"{r} {v[name]}"
             for r, v in RECIPES.items()]
    return f"{what}; " + ", ".join(shown)

class FlagParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag: parse_flags says it in one line, not a usage block
        raise ValueError(message)

parser = FlagParser(description="SDPG on a toy addition task")
general = parser.add_argument_group("the run")
general.add_argument("--out_dir", default="out", help="sft.pt, ckpt.pt and log.jsonl go here")
general.add_argument("--resume", default="", help="continue the run of this ckpt.pt, its flags")
general.add_argument("--eval_every", type=int, default=50, help="RL steps between evaluations")
general.add_argument("--eval_size", type=int, default=1000, help="held-out problems")
general.add_argument("--eval_samples", type=int, default=4, help="n of mean@n, per problem")
general.add_argument("--seed", type=int, default=0, help="the model, data and sampling")
general.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
general.add_argument("--dtype", choices=["float32", "bfloat16"],
                     help="autocast; default bf16 on a GPU that has it, else fp32")
general.add_argument("--compile", action="store_true", help="torch.compile the RL forward")
general.add_argument("--digits", type=int, default=2, help="operand digits of the addition")
general.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
general.add_argument("--n_head", type=int, default=4, help="attention heads")
general.add_argument("--n_embd", type=int, default=128, help="width, a multiple of --n_head")
sft = parser.add_argument_group("stage 1: the supervised warm start of both views")
sft.add_argument("--sft_steps", type=int, default=2000, help="most steps (0 skips the stage)")
sft.add_argument("--sft_batch", type=int, default=64, help="problems per step")
sft.add_argument("--sft_until", type=float, default=0.2, help="until the student solves this")
sft.add_argument("--sft_teacher_until", type=float, default=0.9, help="... and the teacher this")
rl = parser.add_argument_group("stage 2: RL")
rl.add_argument("--rl_steps", type=int, default=300, help="RL steps T (rollout batches)")
rl.add_argument("--algo", default="sdpg", choices=["sdpg", "grpo", "rlsd", "distill"],
                help="the method; distill: L_OPD and L_ref alone, no verifier")
rl.add_argument("--prompts_per_step", type=int, default=32, help="prompts a step, all ranks")
rl.add_argument("--group_size", type=int, default=8, help="G, responses sampled per prompt")
rl.add_argument("--num_minibatches", type=int, default=2, help="updates per rollout batch")
rl.add_argument("--lr", type=float, default=1e-4, help="RL AdamW learning rate")
rl.add_argument("--grad_clip", type=float, default=1.0, help="max grad norm, both stages (0 off)")
rl.add_argument("--temperature", type=float, default=1.0, help="of rollouts and every log-prob")
rl.add_argument("--max_new_tokens", type=int, default=8, help="longest response")
rl.add_argument("--beta", type=float, default=0.05, help="the peak weight of L_OPD")
rl.add_argument("--kl_mode", default="urkl", choices=["urkl", "ufkl", "rkl", "fkl"],
                help="the form of L_ref")
rl.add_argument("--teacher", default="current", choices=["current", "frozen", "ema"],
                help="the teacher's weights")
rl.add_argument("--opd_exclude_eot", action="store_true", help="no L_OPD on end-of-text")
rl.add_argument("--recipe", default="paper", choices=["paper", "release"],
                help="sets the 9 below (sdpg, distill)")
recipe = parser.add_argument_group("set by the recipe unless typed (resolve fills them in)")
recipe.add_argument("--opd_gate", choices=["positive", "all"],
                    help=recipe_help("opd_gate", "distil A > 0, or all"))
recipe.add_argument("--beta_warmup", type=float, help=recipe_help("beta_warmup", "T_warm / T"))
recipe.add_argument("--beta_decay", type=float, help=recipe_help("beta_decay", "T_decay / T"))
recipe.add_argument("--clip_low", type=float, help=recipe_help("clip_low", "eps_low"))
recipe.add_argument("--clip_high", type=float, help=recipe_help("clip_high", "eps_high"))
recipe.add_argument("--dual_clip", type=float, help=recipe_help("dual_clip", "bound for A < 0"))
recipe.add_argument("--kl_cap", type=float, help=recipe_help("kl_cap", "cap of the KL (0 off)"))
recipe.add_argument("--alpha", type=float, help=recipe_help("alpha", "weight of L_ref"))
recipe.add_argument("--kl_in_reward", type=float,
                    help=recipe_help("kl_in_reward", "k1 penalty in the reward"))

def resolve(args, horizon=None):
    """Fill each recipe flag left at None from its row of RECIPES. beta_horizon is the schedule's
    T: horizon, the T a resumed run ran with (main passes it unless --beta_warmup or --beta_decay
    is typed: the schedule then ends at the new --rl_steps), or else --rl_steps."""
    row = RECIPES[args.algo] if args.algo in RECIPES else RECIPES[args.recipe]
    for name, value in row.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.beta_horizon = horizon or args.rl_steps
    return args

# ---- helpers of every phase: printing, errors, the all-reduce, the run's record -----------------

def print0(*args, **kwargs):  # print on rank 0 only (RANK is set by torchrun)
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs, flush=True)

def die(msg):  # one line on stderr (rank 0) and exit 2, never a traceback
    print0(f"sdpg.py: error: {msg}", file=sys.stderr)
    sys.exit(2)

def per_prompt(t, G):  # the first row of each group of G rollouts; None stays None
    return None if t is None else t[::G]

def per_rollout(t, G):  # each row repeated for its G rollouts; None stays None
    return None if t is None else t.repeat_interleave(G, 0)

def all_sum(t):  # sum a tensor over ranks in place (identity in one process); every rank calls it
    if dist.is_initialized():
        dist.all_reduce(t)
    return t

@dataclasses.dataclass
class Run:
    """What every phase reads: the config, the task, where it runs, the models and streams."""
    args: argparse.Namespace
    task: Any
    enc: Any                    # the tiktoken encoding
    device: torch.device
    ctx: Any                    # autocast to bf16, or nullcontext for fp32
    rank: int
    world_size: int
    log: Any                    # log(record): a JSON line in log.jsonl (rank 0): open_log
    model: Any = None           # pi_theta, unwrapped: every no-grad pass uses it
    train_model: Any = None     # model under DDP and compile: the gradient passes
    ref_model: Any = None       # pi_ref, the frozen warm start
    teacher_model: Any = None   # the weights that read c: model, ref_model or an EMA
    optimizer: Any = None
    rl_rng: Any = None          # numpy Generator: problems, random contexts
    gen: Any = None             # torch Generator: rollout sampling
    stop: Any = None            # StopRequest: Ctrl-C or SIGTERM
    stopped: bool = False       # ... ended RL before its last step
    bad_streak: int = 0         # RL steps in a row with a non-finite update
    first_eval: Any = None      # the run's first evaluation record, for the summary
    last_eval: Any = None       # its latest, for the summary and the checkpoint

# ---- stage 1: the supervised warm start of both views, cached in sft.pt -------------------------

def warm_start(run, train_model, stop):
    """Cross-entropy on the answers, half the problems shown with c, until the student view solves
    --sft_until of a validation set and the teacher view --sft_teacher_until (checked every 10
    steps, every step once the student is halfway), or --sft_steps. Returns (finished, val), val
    the two accuracies if short of the bars."""
    args, model = run.args, run.model
    opt = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng([args.seed, run.rank, 0])
    t_start = time.time()
    next_check = 10
    val_set = run.task.sample(np.random.default_rng([args.seed, 2]), VAL_SIZE)  # not held out
    for step in range(1, args.sft_steps + 1):
        inputs, labels = sft_batch(run.enc, run.task, rng, args.sft_batch // run.world_size,
                                   SFT_HINT_FRAC)
        x = torch.tensor(inputs, device=run.device)  # (n, L): c + x + y or x + y, padded right
        y = torch.tensor(labels, device=run.device)  # (n, L): the next token on y, else -1
        check_fits(run, x.size(1), "a warm-start row c + x + y")
        with run.ctx:
            h = train_model(x, return_hidden=True)[y >= 0]  # (N, H): only where a label is
        # the mean over this rank's target tokens, DDP averaging the ranks: the mean over all
        # ranks' tokens when each holds as many, as under addition
        loss = -chunked_token_logprobs(h, model.lm_head_weight, y[y >= 0]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        # Ctrl-C: under DDP the ranks agree every 25 steps (an all-reduce and a host sync)
        ask = not dist.is_initialized() or step % 25 == 0 or step == args.sft_steps
        if ask and stop.any_rank(run.device):
            print0("interrupted during the warm start: nothing saved")
            return False, None
        if step % 100 == 0 or step == args.sft_steps:
            loss_avg = all_sum(loss.detach().clone()).item() / run.world_size
            seconds = time.time() - t_start
            print0(f"sft {step}/{args.sft_steps} | loss {loss_avg:.4f} | {seconds:.0f}s")
            run.log({"phase": "sft", "step": step, "loss": loss_avg, "time": seconds})
        if args.sft_until == 0 or (step != next_check and step != args.sft_steps):
            continue
        student = evaluate(run, model, val_set, ("student",))[0]
        next_check = step + 1 if student >= args.sft_until / 2 else step + 10
        if student < args.sft_until and step < args.sft_steps:
            continue  # the teacher view is checked once the student has its bar
        teacher = evaluate(run, model, val_set, ("teacher",))[1]
        if student >= args.sft_until and teacher >= args.sft_teacher_until:  # both views
            print0(f"sft {step} | val acc {student:.3f}, teacher {teacher:.3f}: warm start done")
            run.log({"phase": "sft", "step": step, "val_acc": student, "val_teacher_acc": teacher})
            return True, None
        if step == args.sft_steps:
            return True, (student, teacher)
    return True, None

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
    x, x_pad = left_pad(x_rows, run.enc.eot_token, run.device)
    cx, cx_pad = left_pad(cx_rows, run.enc.eot_token, run.device)
    return Rollouts(problems, per_rollout(x, G), per_rollout(x_pad, G), per_rollout(cx, G),
                    per_rollout(cx_pad, G), resp, mask, resp == run.enc.eot_token, rewards)

def score_rollouts(run, rollouts, k):
    """Phase 2, the Batch: log pi_old(y_t) and log pi_ref(y_t), each prompt read once for its G
    rows, and the group-relative advantages (official GRPO's of the reward less its k1 penalty;
    rlsd's reweighted per token by the teacher, ray_trainer.py:1632)."""
    args, G = run.args, run.args.group_size
    x, x_pad = rollouts.x[::G], per_prompt(rollouts.x_pad, G)  # (B/G, Tp): each prompt once
    with torch.no_grad(), run.ctx:
        old_logp = run.model.token_logprobs(x, rollouts.resp, G, args.temperature, x_pad)
        ref_logp = run.ref_model.token_logprobs(x, rollouts.resp, G, args.temperature, x_pad)
        if args.algo == "rlsd":  # the teacher's view of the sampled tokens
            cx, cx_pad = rollouts.cx[::G], per_prompt(rollouts.cx_pad, G)
            teacher_logp = run.teacher_model.token_logprobs(cx, rollouts.resp, G,
                                                            args.temperature, cx_pad)
    scores = rollouts.rewards
    if args.kl_in_reward:
        scores = kl_in_reward_scores(scores, old_logp, ref_logp, rollouts.mask, args.kl_in_reward)
    adv = group_advantages(scores, G)  # (B,)
    if args.algo == "rlsd":
        adv = rlsd_advantages(adv, teacher_logp, old_logp, rlsd_lambda(k))  # (B, Tr)
    return Batch(**vars(rollouts), old_logp=old_logp, ref_logp=ref_logp, adv=adv)

def minibatch(run, batch, i, j):
    """Rows i .. j-1 (whole groups), and the teacher's hidden states over them, no gradient: its
    weights read c + x + y, each c + x once for its G rows. h_teacher[b, t] predicts resp[b, t],
    as the student's h[b, t] in minibatch_loss: for 7 + 96 (x = "07+96=", 6 tokens; c + x, 11;
    y = "301" <eot>) the student reads position 5 + t of x + y, the teacher 10 + t of c + x + y."""
    G = run.args.group_size
    rows = {name: v[i:j] if torch.is_tensor(v) else v for name, v in vars(batch).items()}
    mb = Batch(**dict(rows, problems=batch.problems[i // G:j // G]))
    if run.args.algo in ("sdpg", "distill"):  # a distillation term: the teacher's pass
        with torch.no_grad(), run.ctx:
            cx_pad = per_prompt(mb.cx_pad, G)
            mb.h_teacher = run.teacher_model.shared_prefix_hidden(mb.cx[::G], mb.resp, G, cx_pad)
        mb.w_teacher = run.teacher_model.lm_head_weight.detach()  # (V, H): its own head
    return mb

@dataclasses.dataclass
class UpdateStats:  # what phase 3 returns for the step's record
    sums: dict                  # each logged value summed over this rank's response tokens
    skipped: int = 0            # updates skipped for a non-finite loss or gradient
    hook_fields: Any = None     # what the hook returned (a dict); None without a hook
    dt_hook: float = 0.0        # the hook's seconds, left out of the step's

def update(run, batch, beta_k, k, hook):
    """Phase 3: --num_minibatches AdamW steps, each on whole groups: the teacher's pass, the
    loss, backward, and the step unless the gradient is not finite. Returns UpdateStats."""
    args = run.args
    size = len(batch.resp) // args.num_minibatches  # rollouts per mini-batch on this rank
    # the response tokens of each global mini-batch: one all-reduce for all (every rank calls it)
    n_tokens = all_sum(batch.mask.reshape(args.num_minibatches, size, -1).sum((1, 2))).tolist()
    stats = UpdateStats(sums={})
    for j in range(args.num_minibatches):
        mb = minibatch(run, batch, j * size, (j + 1) * size)
        if hook is not None and j == 0:  # the hook sees the first mini-batch, before its update
            t_hook = time.perf_counter()
            stats.hook_fields = hook(run, k, beta_k, mb) or {}
            stats.dt_hook = time.perf_counter() - t_hook
        with run.ctx:
            loss, sums, _ = minibatch_loss(run.train_model, run.model.lm_head_weight, mb,
                                           n_tokens[j], args, beta_k, run.world_size)
        if not optimizer_step(run, loss):
            stats.skipped += 1
        for name, value in sums.items():
            stats.sums[name] = stats.sums.get(name, 0) + value
    return stats

def optimizer_step(run, loss):
    """Backward, the gradient clipped, and AdamW's step unless the gradient is not finite (then
    the weights and Adam's moments stay); the EMA teacher follows. Returns whether it stepped."""
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # the norm of the gradients DDP already averaged: every rank takes the same branch
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.grad_clip or math.inf)
    if not torch.isfinite(norm):
        return False
    run.optimizer.step()
    if run.args.teacher == "ema":  # the teacher's weights follow the model's, trunk and head
        with torch.no_grad():
            for ema, weight in zip(run.teacher_model.parameters(), run.model.parameters()):
                ema.lerp_(weight, EMA_RATE)
    return True

def log_step(run, k, rollouts, stats, beta_k, dt):
    """Phase 4: the step's record over all ranks, printed and logged: the loss terms per
    response token, the reward per rollout, signal_frac the share of groups whose rewards
    differ (A = 0 elsewhere, unless kl_in_reward), beta(k), speed; the hook's fields after."""
    G = run.args.group_size
    rewards = rollouts.rewards.view(-1, G)  # (B/G, G)
    totals = dict(stats.sums, signal=(rewards.amax(1) != rewards.amin(1)).sum(),
                  reward=rollouts.rewards.sum(), tokens=rollouts.mask.sum(),
                  rollouts=torch.tensor(float(len(rollouts.rewards))))
    summed = all_sum(torch.stack([v.float().to(run.device) for v in totals.values()])).tolist()
    totals = dict(zip(totals, summed))  # over ranks
    n_rollouts, n_tokens = totals["rollouts"], totals["tokens"]
    rec = {"phase": "rl", "step": k, "reward": totals["reward"] / n_rollouts,
           "signal_frac": totals["signal"] * G / n_rollouts, "resp_len": n_tokens / n_rollouts}
    for name in stats.sums:
        rec[name] = totals[name] / n_tokens
    rec["beta_k"] = beta_k
    if run.args.algo == "rlsd":
        rec["rlsd_lambda"] = rlsd_lambda(k)
    rec.update(tok_per_s=n_tokens / dt, dt=dt, skipped=stats.skipped)
    if stats.hook_fields is not None:  # a hook adds fields, never replaces the step's own
        rec["dt_hook"] = stats.dt_hook
        clash = sorted(set(rec) & set(stats.hook_fields))
        if clash:
            die_all(f"the hook returned {', '.join(clash)}, which the step logs itself", run)
        rec.update(stats.hook_fields)
    print0(f"step {k}/{run.args.rl_steps} | " + fields_line(rec, ".4g"))
    run.log(rec)

# ---- the run: setup, stage 1, stage 2 -----------------------------------------------------------

def setup(args, task, ckpt, stop):
    """The processes, the model sized for the task, the log, stage 1 (the warm start, or its
    cache in sft.pt), then pi_ref, the teacher's weights, AdamW and the RL streams: the Run."""
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
    print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | vocab "
           f"{enc.n_vocab} | device {device} | world {world_size}")
    warm_start_cached(run, model_args, ckpt, stop)  # stage 1, or its cache in sft.pt
    run.ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # pi_ref
    if args.teacher == "current":  # the official code's: the model itself
        run.teacher_model = model
    elif args.teacher == "frozen":  # pi_ref, head included
        run.teacher_model = run.ref_model
    else:  # ema: starts at the warm start and follows the model (optimizer_step)
        run.teacher_model = copy.deepcopy(run.ref_model)
    run.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    run.rl_rng = np.random.default_rng([args.seed, rank, 1])  # problems, contexts
    run.gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)  # sampling
    return run

def train(args, task, hook, ckpt, stop):
    """Both stages: setup, then RL from step 1 (or from ckpt, a checkpoint's contents). The
    extension point of tools/: hook(run, k, beta_k, mb), if given, sees each step's first
    mini-batch (a Batch) before its update, on every rank; the dict it returns (rank 0's) is
    logged with the step. It changes nothing; its time is dt_hook, not dt."""
    run = setup(args, task, ckpt, stop)
    start = resume(run, ckpt) if ckpt is not None else 0
    run.train_model = wrap_ddp(run, run.model)  # gradient passes: DDP averages over ranks
    if args.compile:
        run.train_model = torch.compile(run.train_model)
    if run.last_eval is None:  # the first evaluation, or one at the step a resume starts from
        run.last_eval = run_eval(run, start)
    run.first_eval = run.first_eval or run.last_eval
    t_run = time.time()
    for k in range(start + 1, args.rl_steps + 1):  # the official step numbering starts at 1
        t0 = time.perf_counter()
        beta_k = 0.0
        if args.algo in ("sdpg", "distill"):  # T: --rl_steps, or a resumed run's own (resolve)
            beta_k = beta_schedule(k, args.beta_horizon, args.beta, args.beta_warmup,
                                   args.beta_decay)
        rollouts = sample_rollouts(run, args.prompts_per_step // run.world_size)
        batch = score_rollouts(run, rollouts, k)
        stats = update(run, batch, beta_k, k, hook)
        if run.device.type == "cuda":
            torch.cuda.synchronize()  # for the step's time
        log_step(run, k, rollouts, stats, beta_k, time.perf_counter() - t0 - stats.dt_hook)
        if upkeep(run, k, stats.skipped):  # evaluation, checkpoint, non-finite streak, Ctrl-C
            break
    return finish(run, start, t_run)

def main(argv=None, task=None, hook=None):
    """python sdpg.py [flags]: parse, check, train. Tools call it with a task or a hook. A resume
    takes every flag not typed from the run it continues; it restores the signal handlers."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_flags(argv, "")
    ckpt, horizon = None, None
    if args.resume:
        ckpt = read_resume(args.resume)
        if args.beta_warmup is None and args.beta_decay is None:  # the schedule not typed:
            horizon = ckpt["config"]["beta_horizon"]  # it keeps the T it ran with
        where = f"--resume {args.resume}: its config: "  # its own flags, then the typed ones
        args = parse_flags(saved_flags(ckpt["config"]) + argv, where)
    args = resolve(args, horizon)
    if task is None:
        try:
            task = AdditionTask(args.digits, args.eval_size)  # the task interface: data.py
        except ValueError as e:
            die(str(e))
    stop = StopRequest()  # Ctrl-C or SIGTERM: finish the step, save, exit
    try:
        return train(args, task, hook, ckpt, stop)
    finally:
        stop.restore()

# ======== What a first reading may skip: evaluation, flag checks, devices, processes, the log, ===
# signals, the warm-start cache, checkpoints and resume, the upkeep of the loop.

CONTEXT_SEED = 4321  # draws the held-out contexts that involve chance: the same every time
def generate_padded(run, model, rows, n=1, temperature=0.0, gen=None):  # rows: token lists
    check_fits(run, max(map(len, rows)) + run.args.max_new_tokens, "a prompt and its response")
    x, n_pad = left_pad(rows, run.enc.eot_token, run.device)  # -> n responses each, their masks
    with run.ctx:
        return model.generate(x, run.args.max_new_tokens, run.enc.eot_token, n, temperature,
                              gen, n_pad=n_pad)

@torch.no_grad()
def evaluate(run, model, problems, views=("student", "teacher")):
    """Greedy accuracy of model's views (x, c + x) in views, else None; each rank its shard."""
    mine = problems[run.rank::run.world_size]
    prompts = encode_batch(run.enc, run.task, problems, np.random.default_rng(CONTEXT_SEED))
    correct = torch.tensor([0.0, 0.0, len(mine)], device=run.device)  # student, teacher, problems
    for i, view in enumerate(("student", "teacher")):  # prompts[0]: x, prompts[1]: c + x
        if mine and view in views:
            resp, _ = generate_padded(run, model, prompts[i][run.rank::run.world_size])
            correct[i] = sum(verify(run.enc, run.task, resp, mine))
    student, teacher, n = all_sum(correct).tolist()
    student_acc = student / n if "student" in views else None
    return student_acc, teacher / n if "teacher" in views else None

@torch.no_grad()
def mean_at_n(run, problems, n):
    """mean@n, the paper's metric (n samples at temperature 1), and its 95% interval over
    problems; its own generator: the training streams do not move."""
    mine = problems[run.rank::run.world_size]
    stats = torch.zeros(3, dtype=torch.float64, device=run.device)  # sum acc, sum acc^2, count
    if mine:
        x_rows = encode_batch(run.enc, run.task, mine, np.random.default_rng(CONTEXT_SEED))[0]
        gen = torch.Generator(device=run.device).manual_seed(run.args.seed + 7919 + run.rank)
        resp, _ = generate_padded(run, run.model, x_rows, n, 1.0, gen)
        rewards = torch.tensor(verify(run.enc, run.task, resp, mine, n)).double()
        acc = rewards.view(-1, n).mean(1)  # (problems,) each one's mean over its n samples
        stats += torch.tensor([acc.sum(), (acc ** 2).sum(), len(mine)], device=run.device)
    total, total_sq, count = all_sum(stats).tolist()
    mean = total / count
    return mean, 1.96 * math.sqrt(max(0.0, total_sq / count - mean ** 2) / max(1, count - 1))
def run_eval(run, k):  # evaluate at RL step k: both views, mean@n; print, log and return it
    args, problems = run.args, run.task.eval_set
    student_acc, teacher_acc = evaluate(run, run.model, problems)
    rec = {"phase": "eval", "step": k, "eval_acc": student_acc, "teacher_acc": teacher_acc}
    if args.teacher != "current":  # teacher_acc: the weights distilled from; the model's view too
        rec["current_teacher_acc"] = teacher_acc
        rec["teacher_acc"] = evaluate(run, run.teacher_model, problems, ("teacher",))[1]
    if args.eval_samples:
        mean, ci95 = mean_at_n(run, problems, args.eval_samples)
        rec[f"mean@{args.eval_samples}"] = mean
        rec[f"mean@{args.eval_samples}_ci95"] = ci95
    print0(f"eval step {k}/{args.rl_steps} | " + fields_line(rec, ".3f"))
    run.log(rec)
    return rec
def fields_line(rec, spec):  # "name value | name value ...": a record's fields after its step
    return " | ".join(f"{name} {rec[name]:{spec}}" for name in list(rec)[2:])

# the range of each number flag, [low, high]: a typo is one line, not a run that never ends
RANGES = {"eval_every": (0, 1e9), "eval_size": (1, 1e6), "eval_samples": (0, 4096),
          "seed": (0, 2 ** 32 - 1), "digits": (1, 6), "n_layer": (1, 4096), "n_head": (1, 4096),
          "n_embd": (1, 4096), "sft_steps": (0, 1e9), "sft_batch": (1, 1e5), "sft_until": (0, 1),
          "sft_teacher_until": (0, 1), "rl_steps": (0, 1e9), "prompts_per_step": (1, 1e5),
          "group_size": (2, 4096), "num_minibatches": (1, 4096), "lr": (0, 1e9),
          "grad_clip": (0, 1e9), "temperature": (0, 1e9), "max_new_tokens": (1, 4096),
          "beta": (0, 1e9), "beta_warmup": (0, 1), "beta_decay": (0, 1), "clip_low": (0, 0.999),
          "clip_high": (0, 1e9), "dual_clip": (1, 1e9), "kl_cap": (0, 1e9), "alpha": (0, 1e9),
          "kl_in_reward": (0, 1e9)}
ABOVE_LOW = ("lr", "temperature", "dual_clip")  # these must be above their low end
def parse_flags(argv, where):  # the flags, each number in its range; else one line
    try:
        args = parser.parse_args(argv)
    except ValueError as e:
        die(f"{where}{e}")
    for name, (low, high) in RANGES.items():
        value = getattr(args, name)
        if value is None:  # a recipe flag not typed
            continue
        if not (low <= value <= high) or (name in ABOVE_LOW and value == low):
            die(f"{where}argument --{name}: {value} is not in [{low:g}, {high:g}]")
    return args

def setup_distributed(args):
    """torchrun: a process per device, cuda:LOCAL_RANK (nccl) or the CPU (gloo); else one."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size, ddp = int(os.environ.get("WORLD_SIZE", 1)), "RANK" in os.environ
    if not (args.device in ("auto", "cpu") or re.fullmatch(r"cuda(:[0-9]+)?", args.device)):
        die(f"--device {args.device}: use auto, cpu, cuda or cuda:N")
    cuda_here = torch.cuda.is_available()
    use_cuda = args.device.startswith("cuda") or (args.device == "auto" and cuda_here)
    if use_cuda and not cuda_here:
        die(f"--device {args.device}: CUDA is not available on this machine")
    device = torch.device("cpu")
    if use_cuda:
        gpus, local_world = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 0))
        if ddp and args.device not in ("auto", "cuda"):
            die(f"--device {args.device} cannot be used under torchrun: each process takes "
                f"cuda:LOCAL_RANK (use --device cuda, and CUDA_VISIBLE_DEVICES to choose)")
        if ddp and max(local_world, local_rank + 1) > gpus:  # every process checks
            die(f"torchrun started more processes on this node than it has GPUs ({gpus}): use "
                f"--nproc_per_node <= {gpus}, or --device cpu")
        device = torch.device(args.device if ":" in args.device else f"cuda:{local_rank}")
        if device.index >= gpus:
            die(f"--device {args.device}: the machine has {gpus} GPU(s), cuda:0 to cuda:{gpus - 1}")
        torch.cuda.set_device(device)  # before the process group, so that nccl binds this GPU
    if ddp and use_cuda:
        dist.init_process_group(backend="nccl", device_id=device)
    elif ddp:
        dist.init_process_group(backend="gloo")
    return rank, local_rank, world_size, device, use_cuda
def wrap_ddp(run, module):  # under DDP when there are several processes: the gradient passes
    if not dist.is_initialized():
        return module
    return DDP(module, device_ids=[run.device.index] if run.device.type == "cuda" else None)
def pick_dtype(args, use_cuda):  # bf16 autocast on a GPU that has it natively, else fp32
    native = use_cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    if use_cuda and not native and args.dtype == "bfloat16":
        die_all("--dtype bfloat16: this GPU has no native bfloat16; use --dtype float32")
    if use_cuda and not native and args.dtype is None:
        print0("dtype: this GPU has no native bfloat16: float32 (--dtype float32 says so)")
    if args.dtype is None:
        args.dtype = "bfloat16" if native else "float32"
def model_size(args, task, enc, world_size):  # GPT's arguments, once the batches and answer fit
    # the held-out contexts drawn as evaluation draws them (CONTEXT_SEED): evaluation fits
    _, cx_rows, targets = encode_batch(enc, task, task.eval_set,
                                       np.random.default_rng(CONTEXT_SEED))
    if args.prompts_per_step % (world_size * args.num_minibatches) or args.sft_batch % world_size:
        die_all(f"--prompts_per_step {args.prompts_per_step} must split evenly over {world_size} "
                f"ranks x --num_minibatches {args.num_minibatches}, and --sft_batch over the ranks")
    if args.n_embd % args.n_head:
        die_all(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    longest = max(map(len, targets))  # an answer and its end-of-text
    if args.max_new_tokens < longest:
        die_all(f"--max_new_tokens must be >= {longest}: the answer and end-of-text")
    # the block size: the longest held-out teacher prompt c + x and --max_new_tokens after it
    return dict(block_size=max(map(len, cx_rows)) + args.max_new_tokens, n_layer=args.n_layer,
                vocab_size=enc.n_vocab, n_head=args.n_head, n_embd=args.n_embd)
def check_fits(run, length, what):  # one line if a sequence outgrows the block size
    if length > run.model.config.block_size:  # the rank that sees it says so; torchrun stops all
        print(f"sdpg.py: error: {run.task!r}: {what} of {length} tokens outgrows the block size "
              f"{run.model.config.block_size} (held-out c + x, --max_new_tokens)", file=sys.stderr)
        sys.exit(2)

def open_log(args, rank):  # log(record): a JSON line appended to log.jsonl by rank 0
    path = os.path.join(args.out_dir, "log.jsonl")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        if rank == 0 and not args.resume:  # a new run starts the file; a resumed one appends
            open(path, "w").close()
    except OSError as e:
        die(f"--out_dir {args.out_dir}: {e.strerror}")
    def log(record):  # the file opened and closed for each line; the other ranks write nothing
        if rank == 0:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
    return log
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
        self.requested, self.when, self.replaced = False, 0.0, {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.replaced[sig] = signal.signal(sig, self.handle)

    def restore(self):
        for sig, handler in self.replaced.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.requested and time.time() - self.when > 2:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self.when = True, time.time()

    def any_rank(self, device):  # every rank calls it: under DDP an all-reduce and a host sync
        if not dist.is_initialized():
            return self.requested
        return all_sum(torch.tensor(float(self.requested), device=device)).item() > 0
def upkeep(run, k, skipped):  # after step k, every rank; True: Ctrl-C or SIGTERM, stop
    args = run.args
    evaluated = (args.eval_every and k % args.eval_every == 0) or k == args.rl_steps
    if evaluated:
        run.last_eval = run_eval(run, k)
        save_checkpoint(run, k, True)
    run.bad_streak = run.bad_streak + 1 if skipped else 0
    if run.bad_streak >= MAX_BAD_STEPS:  # the last checkpoint is kept
        die_all(f"{run.bad_streak} steps in a row had non-finite gradients; try a lower --lr", run)
    run.stopped = run.stop.any_rank(run.device)
    if run.stopped:  # saved now unless just saved with its evaluation
        if not evaluated:
            save_checkpoint(run, k, False)
        print0(f"interrupted: stopped after step {k}/{args.rl_steps}; continue with --resume "
               f"{os.path.join(args.out_dir, 'ckpt.pt')}")
    return run.stopped
def finish(run, start, t_run):  # the summary line; every rank leaves the process group
    if start == run.args.rl_steps:  # resumed at its last step: nothing ran, the checkpoint stays
        save_checkpoint(run, start, True)
    first, last, out = run.first_eval, run.last_eval, run.args.out_dir
    accuracies = " | ".join(f"{name} {first[name]:.3f} (step {first['step']}) -> "
                            f"{last[name]:.3f} (step {last['step']})"
                            for name in ("eval_acc", "teacher_acc"))
    print0(f"{'stopped' if run.stopped else 'done'}: RL {time.time() - t_run:.0f}s | "
           f"{accuracies} | files in {out}/ | curves: python tools/plot.py {out}/log.jsonl")
    teardown(run)
    return run

def warm_start_cached(run, model_args, ckpt, stop):  # stage 1, or its cache in sft.pt
    args = run.args
    path, key = os.path.join(args.out_dir, "sft.pt"), sft_key(run, model_args)
    cached, val = {}, None
    if ckpt is None and os.path.exists(path):  # reused if readable and of every input of stage 1
        try:
            cached = load_checkpoint(path, {"model": dict, "key": dict})
        except ValueError as e:
            print0(f"warm start: ignoring {e}")
    if cached.get("key") == key:
        run.model.load_state_dict(cached["model"])
        print0(f"warm start: reusing {path}")
        val = cached.get("val")
    elif ckpt is None and args.sft_steps > 0:
        finished, val = warm_start(run, wrap_ddp(run, run.model), stop)
        if not finished:  # interrupted
            teardown(run)
            raise SystemExit(130)
        save_or_stop(run, {"model": run.model.state_dict(), "key": key, "val": val}, path)
    if val:  # below its bars, now or when it ran: say and log that RL starts from a weaker model
        print0(f"warm start: {args.sft_steps} steps did not reach the bars (student {val[0]:.3f} "
               f"of {args.sft_until}, teacher {val[1]:.3f} of {args.sft_teacher_until})")
        run.log({"phase": "sft", "reached": False, "val_acc": val[0], "val_teacher_acc": val[1]})
def sft_key(run, model_args):  # every input of stage 1: sft.pt is reused only if all are equal
    key = {name: getattr(run.args, name) for name in ("seed", "sft_steps", "sft_batch",
           "sft_until", "sft_teacher_until", "grad_clip", "max_new_tokens", "dtype")}
    return dict(key, task=repr(run.task), tokenizer=run.enc.name, model_args=model_args,
                world_size=run.world_size, device=run.device.type, sft_lr=SFT_LR,
                hint_frac=SFT_HINT_FRAC, weight_decay=WEIGHT_DECAY, val_size=VAL_SIZE,
                format=CKPT_FORMAT)
def save_atomic(obj, path):  # to path.tmp, then renamed: a kill mid-save keeps the old file
    try:
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    finally:
        if os.path.isfile(path + ".tmp"):
            os.remove(path + ".tmp")
def save_or_stop(run, obj, path):  # rank 0 saves obj; if that fails, every rank stops
    err = [""]
    if run.rank == 0:
        try:
            save_atomic(obj, path)
        except (OSError, RuntimeError) as e:  # disk full, no permission (torch.save raises either)
            why = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1][-120:]
            err = [f"saving {path}: {why}; the previous file is intact"]
    if dist.is_initialized():
        dist.broadcast_object_list(err, src=0)
    if err[0]:
        die_all(err[0], run)
CKPT_FORMAT = 3  # 3: the MLP's layers named c_fc, c_proj; 2: T_warm, T_decay shares of T
def save_checkpoint(run, step, evaluated):  # every rank calls it
    streams = {"numpy": run.rl_rng.bit_generator.state, "torch_gen": run.gen.get_state(),
               "torch": torch.get_rng_state(), "device": run.gen.device.type}
    rngs = [streams] * run.world_size
    if dist.is_initialized():
        dist.all_gather_object(rngs, streams)
    teacher = run.teacher_model.state_dict() if run.args.teacher == "ema" else {}  # its own
    ckpt = dict(model=run.model.state_dict(), ref_model=run.ref_model.state_dict(), rng=rngs,
                step=step, optimizer=run.optimizer.state_dict(), model_args=vars(run.model.config),
                config=vars(run.args), task=repr(run.task), evaluated=evaluated,
                evals=[run.first_eval, run.last_eval], teacher_model=teacher, format=CKPT_FORMAT)
    save_or_stop(run, ckpt, os.path.join(run.args.out_dir, "ckpt.pt"))
def load_checkpoint(path, types):
    """torch.load, weights_only (no code runs), each field of types checked; else a ValueError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever the file is: one line, never a traceback
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
        raise ValueError(f"{path}: not a readable checkpoint ({why})") from None
    bad = []
    for name, kind in types.items():
        value = ckpt.get(name) if isinstance(ckpt, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            bad.append(name)
    if bad:
        raise ValueError(f"{path}: not an SDPG checkpoint (no valid {', '.join(bad)})")
    return ckpt

def read_resume(path):  # the checkpoint --resume names, its fields and its format checked
    if not os.path.isfile(path):
        die(f"--resume {path}: no such file")
    try:
        ckpt = load_checkpoint(path, dict(model=dict, ref_model=dict, optimizer=dict, step=int,
                                          model_args=dict, config=dict, rng=list))
    except ValueError as e:
        die(f"--resume {e}")
    version = ckpt.get("format", 1)  # format 1 had no format field
    if version != CKPT_FORMAT or type(ckpt["config"].get("beta_horizon")) is not int:
        die(f"--resume {path}: format {version}, this sdpg.py's is {CKPT_FORMAT}")
    return ckpt
def saved_flags(config):  # a checkpoint's config as flags (main parses them as if typed)
    flags = []
    for action in parser._actions[1:]:  # [0] is --help
        value = config.get(action.dest)
        if action.dest != "resume" and value is not None and value is not False:
            flags.append(action.option_strings[0])
            if value is not True:
                flags.append(str(value))
    return flags
# a resumed run continues the same algorithm: these flags must equal the checkpoint's
SAME_ON_RESUME = ("algo", "recipe", "beta", "alpha", "clip_low", "clip_high", "dual_clip",
                  "opd_gate", "kl_cap", "opd_exclude_eot", "kl_in_reward", "kl_mode", "teacher",
                  "group_size", "prompts_per_step", "num_minibatches", "temperature", "lr",
                  "grad_clip", "max_new_tokens", "seed", "dtype", "n_layer", "n_head", "n_embd")
def check_resume(args, task, ckpt):  # one line for a resume that changes the run
    for name in SAME_ON_RESUME:
        if ckpt["config"].get(name) != getattr(args, name):
            die_all(f"--resume: --{name} {getattr(args, name)} differs from the run it continues "
                    f"({ckpt['config'].get(name)}); a resumed run keeps its algorithm")
    if ckpt["step"] > args.rl_steps or ckpt.get("task") != repr(task):
        die_all(f"--resume: the checkpoint (step {ckpt['step']} of {ckpt.get('task')}) cannot "
                f"continue as --rl_steps {args.rl_steps} of {task!r}")
def resume(run, ckpt):
    """Load ckpt into the models, AdamW, the streams (if they fit) and the run's evaluations;
    print and log what typed flags changed and the schedule in steps."""
    args, config, T = run.args, ckpt["config"], run.args.beta_horizon
    parts = {"model": run.model, "ref_model": run.ref_model, "optimizer": run.optimizer}
    if args.teacher == "ema":  # the EMA teacher's own weights
        parts["teacher_model"] = run.teacher_model
    try:
        for name, part in parts.items():
            part.load_state_dict(ckpt[name])
    except Exception as e:  # shapes, names, Adam's state: one line
        die_all(f"--resume {args.resume}: its weights do not fit the model ({type(e).__name__})")
    restore_streams(run, ckpt["rng"])
    changed = {name: [config.get(name), v] for name, v in vars(args).items()
               if name != "resume" and config.get(name) != v}
    note = f" | beta's schedule ends at step {T}" if args.algo in ("sdpg", "distill") else ""
    print0(f"resumed from {args.resume} at step {ckpt['step']}" + "".join(
        f" | {name} {old} -> {new}" for name, (old, new) in changed.items()) + note)
    schedule = {"warmup": args.beta_warmup * T, "decay": args.beta_decay * T, "horizon": T}
    run.log({"phase": "resume", "step": ckpt["step"], "from": args.resume, "changed": changed,
             "schedule": schedule})
    evals = ckpt.get("evals")  # [first, latest] evaluation records, checked as every field
    if isinstance(evals, list) and len(evals) == 2 and all(
            isinstance(e, dict) and {"step", "eval_acc", "teacher_acc"} <= set(e) for e in evals):
        run.first_eval = evals[0]
        run.last_eval = evals[1] if ckpt.get("evaluated") is True else None  # else at its step
    return ckpt["step"]
def restore_streams(run, saved):  # this rank's, if every state fits; else the fresh ones stay
    try:
        streams, rl_rng, gen = saved[run.rank], np.random.default_rng(), torch.Generator(run.device)
        if len(saved) != run.world_size or streams["device"] != run.device.type:
            raise ValueError(f"saved with {len(saved)} ranks on {streams['device']}, running "
                             f"{run.world_size} on {run.device.type}")
        rl_rng.bit_generator.state = streams["numpy"]
        gen.set_state(streams["torch_gen"])
        torch.set_rng_state(streams["torch"])  # last: nothing is set unless every state fits
        run.rl_rng, run.gen = rl_rng, gen
    except Exception as e:  # another world, or states that do not fit their device
        print0(f"resume: its streams do not fit ({e!s:.100}): new streams")

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C: at once, without saving
        print0("sdpg.py: interrupted twice: stopped at once; the last checkpoint is kept")
        sys.exit(130)
