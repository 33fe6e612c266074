"""
Self-Distilled Policy Gradient (SDPG, arXiv 2606.04036) in one file of plain PyTorch.

One model pi_theta, two views of it: the student p_t = pi_theta(.|x, y_<t) sees the problem x;
the teacher q_t = pi_theta(.|c, x, y_<t) also sees a privileged context c (the answer, or with
--context a hint, a partial, noisy or irrelevant one, to probe how good c must be). Rollouts
y ~ student. At RL step k = 1..T the loss, a token-mean over all response tokens of the batch, is

    L = L_out + beta(k) * L_OPD + alpha * L_ref
    L_out  = max(-A r_t, -A clip(r_t, 1-eps_low, 1+eps_high)), capped at -A*c when A < 0
             r_t = pi_theta(y_t) / pi_old(y_t),  A_i = (R_i - mean_G R) / (std_G R + eps)
    L_OPD  = [A_i > 0] * min(20, sum_a p_t(a) (log p_t(a) - log SG q_t(a)))   exact, every vocab entry
    L_ref  = 0.5 * (log pi_theta(y_t) - log pi_ref(y_t))^2           (urkl; ufkl, rkl, fkl too)
    beta(k) = beta * min(1, k / T_warm) * min(1, (T - k) / T_decay)

Stage 1 (supervised warm start, standing in for pretraining) teaches both views, the teacher view
with the same kind of c as in RL, at the same noise; stage 2 is RL.

Two recipes (--recipe), because the paper and the authors' released script run different ones:
    paper    the gate [A_i > 0] on; beta warmed up over the first T/8 steps and decayed over the
             last 7T/8; clip (0.2, 0.2); where the paper is silent, the released code's values
             (dual clip c = 10, the per-token KL cap of 20)
    release  the gate off; beta constant; clip (0.2, 0.28) with dual clip c = 10; KL cap 20
A flag given explicitly wins over the recipe; the config record in log.jsonl holds what ran.

Implementation choices, each deliberate:
 1. The teacher is the current model (same weights, extra context), recomputed without gradient
    inside every mini-batch update, as the official code does: it moves with the student.
 2. The reference pi_ref is a frozen copy of the warm-start model. pi_old, the weights that
    sampled the rollouts, gives the PPO ratio; the two are kept apart by name.
 3. Every term is a token-mean over the response tokens of the global mini-batch (all ranks),
    including the gated OPD term: gated-out rollouts count in the denominator with zero loss.
    (The official code normalises per micro-batch, which at LLM scale is close to this.)
 4. The temperature divides student and teacher logits alike, so both are distributions of the
    same sampling policy (the official code divides only the student's, and keeps the teacher in
    bf16; here the KL is fp32). At the default temperature 1 in fp32 these differences vanish.
 5. The step k of beta(k) and of RLSD's lambda counts from 1, as the official trainer's does:
    beta(1) = beta / T_warm, beta(T) = 0. The reward is 1/0 (the official verifier's is +1/-1:
    the same advantages; in GRPO's reward-KL penalty, the same as half its coefficient).
 6. DAPO dynamic sampling is off unless --filter_groups: the released scripts set it, but the
    released trainer never reads the setting, so no official run drops a group.
 7. Baselines as in their official scripts: --algo grpo is clip (0.2, 0.2), no dual clip (c = 1000),
    no reference loss term but a k1 KL penalty in the reward (kl_in_reward_scores); --algo rlsd
    reweights the advantage per token from teacher log-probs taken once per rollout batch
    (rlsd_advantages); --algo opd keeps the distillation term alone, ungated. "SDPG without
    beta" is --beta 0 (GRPO plus the reference term, under the recipe's clip).
 8. The official release warms the learning rate up over 10 rollout steps; here it is constant,
    for every method alike. kl_ref is logged with the k3 estimator exp(-log w) - 1 + log w >= 0.
 9. No (tokens, V) tensor of the whole batch is ever formed: the lm_head is applied in chunks, and
    the exact KL's backward uses its closed form (fused_reverse_kl in model.py; full_vocab_reverse_kl
    here is the readable reference the tests hold it to). The no-grad passes (teacher, pi_old,
    pi_ref) run each prompt once and share it among its G responses (GPT.score).
10. A non-finite gradient skips the update; Ctrl-C finishes the step, saves and exits.

The official code cited below is github.com/yifanzhang-pro/SDPG at 0c818c0 (core_algos.py is
verl/trainer/ppo/core_algos.py, dp_actor.py verl/workers/actor/dp_actor.py, the scripts
examples/rpg2_trainer/run_qwen3_4b_*_boxed.sh).

Run:
    python sdpg.py                                  # CPU or one GPU
    torchrun --standalone --nproc_per_node=4 sdpg.py
"""
import argparse
import copy
import gc
import os
import platform
import time
from contextlib import nullcontext

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import CONTEXTS, AdditionTask, encode_batch, get_encoding
from model import GPT, GPTConfig, chunked_entropy, chunked_token_logprobs, fused_reverse_kl, response_hidden
from plumbing import (JsonlLog, StopRequest, all_sum, die, dynamic_sampling, evaluate, first_wrong, group_has_signal,
                      load_checkpoint, loss_diagnostics, print0, resume, sampled_eval, save_checkpoint,
                      setup_distributed, validate, verify, warm_start)

# -----------------------------------------------------------------------------
# the terms of the loss, each one function (tests import them)

def group_advantages(rewards, group_size, eps=1e-6):
    """A_i = (R_i - mean_G R) / (std_G R + eps), std as torch.std (unbiased).
    rewards: (N*G,) with each group's G responses consecutive -> (N*G,).
    A group whose rewards are all equal gets A = 0: it carries no signal."""
    r = rewards.view(-1, group_size)  # (N, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def rlsd_advantages(adv, teacher_logp, old_logp, lam, clip=0.2):
    """RLSD (arXiv 2604.03128): no distillation loss; the teacher reweights the advantage per token.
    delta_t = SG(clamp(log q_t(y_t) - log pi_old(y_t), -20, 20)),
    w_t = clip(exp(sign(A) delta_t), 1 - clip, 1 + clip),  A_t = (1 - lam) A + lam A w_t:
    a correct rollout's tokens the teacher favours, and a wrong one's tokens it disfavours, weigh up
    to 1 + clip (official: core_algos.py:461-477). adv (B,), teacher_logp, old_logp (B, Tr) -> (B, Tr)."""
    a = adv[:, None]
    delta = (teacher_logp - old_logp).detach().clamp(-20, 20)
    w = torch.clamp(torch.exp(torch.sign(a) * delta), 1 - clip, 1 + clip)
    return (1 - lam) * a + lam * a * w


def kl_in_reward_scores(rewards, old_logp, ref_logp, mask, coef):
    """Official GRPO's reward: s_i = R_i - coef * sum_t (log pi_old(y_t) - log pi_ref(y_t)), the k1
    estimate of KL(pi_old || pi_ref) summed over the response (ray_trainer.py:91-97 subtracts it per
    token, core_algos.py:629 sums the token rewards). (B,), (B, Tr) x3 -> (B,); advantages follow as usual."""
    return rewards - coef * ((old_logp - ref_logp) * mask).sum(1)


def clipped_surrogate(logp, old_logp, adv, clip_low=0.2, clip_high=0.28, dual_clip=10.0):
    """Per-token DAPO loss l_t = max(-A r_t, -A clip(r_t, 1-clip_low, 1+clip_high)),
    and for A < 0 the dual clip l_t = min(l_t, -A * dual_clip); r_t = exp(logp - old_logp).
    logp, old_logp: (B, T); adv broadcasts to (B, T).
    Returns the loss (B, T) and a bool (B, T), True where a clip is active (zero gradient)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    capped = (adv < 0) & (loss > -adv * dual_clip)
    loss = torch.where(capped, -adv * dual_clip, loss)
    return loss, (clipped > unclipped) | capped


def full_vocab_reverse_kl(student_logits, teacher_logits):
    """KL(p || SG q) = sum_a p(a) (log p(a) - log q(a)) over every vocabulary entry a,
    p = softmax(student_logits), q = softmax(teacher_logits) held constant (no gradient).
    (..., V), (..., V) -> (...). Computed in fp32 at least. d/dz_student = p (log p - log q - KL)."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logp = F.log_softmax(student_logits.to(dtype), dim=-1)
    logq = F.log_softmax(teacher_logits.detach().to(dtype), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def ref_penalty(logp, ref_logp, mode):
    """Reference anchor on sampled tokens, log w = log pi_theta(y_t) - log pi_ref(y_t):
    urkl 0.5 (log w)^2 | ufkl pi_ref/pi_theta + log w | rkl 0.5 (log w + 1)^2 | fkl pi_ref/pi_theta.
    (B, T), (B, T) -> (B, T)."""
    log_w = logp - ref_logp
    if mode == "urkl":
        return 0.5 * log_w ** 2
    if mode == "ufkl":
        return torch.exp(-log_w) + log_w
    if mode == "rkl":
        return 0.5 * (log_w + 1) ** 2
    if mode == "fkl":
        return torch.exp(-log_w)
    raise ValueError(f"unknown kl mode {mode!r}: use urkl, ufkl, rkl or fkl")


def beta_schedule(step, total_steps, beta, warmup, decay):
    """beta(k) = beta * min(1, k / T_warm) * min(1, (T - k) / T_decay) at step k = 1 .. T, counted
    from 1 as the official trainer does (core_algos.py:191-210): beta(1) = beta / T_warm, beta(T) = 0.
    warmup = 0 or decay = 0 switches that factor off."""
    up = min(1.0, step / warmup) if warmup > 0 else 1.0
    down = min(1.0, max(0.0, (total_steps - step) / decay)) if decay > 0 else 1.0
    return beta * up * down


def sampled_logprobs(model, prompts, resp, group_size, temperature, chunk_size):
    """log pi(resp_t | prompt, resp_<t) of every response token, (P*G, Tr), for prompts (P, Tp)
    each shared by G consecutive responses; no gradient, no logits of the whole batch at once.
    Used for the pi_old and pi_ref passes."""
    h = model.score(prompts, resp, group_size)  # (P*G, Tr, H)
    return chunked_token_logprobs(h.flatten(0, 1), model.lm_head_weight, resp.flatten(), temperature,
                                  chunk_size).view(resp.shape)


def minibatch_loss(model, weight, mb, args, beta, n_tokens_global, world_size):
    """The loss of one mini-batch on this rank, scaled so that DDP's gradient average over
    ranks yields the token-mean over the global mini-batch. model: the (possibly DDP-wrapped)
    student; weight: the tied output matrix W (V, H). mb holds the rollouts: the student prompts,
    resp and mask (B, Tr), adv (B,) or per token (B, Tr) for rlsd, old_logp and ref_logp (B, Tr),
    and for sdpg and opd the teacher's hidden states h_teacher (B, Tr, H), computed without gradient,
    and for the logs is_eot and first_wrong (B, Tr), True at end-of-text tokens and at the token
    where a rollout first departs from the reference answer.
    args.algo picks the terms: sdpg out + ref + opd, grpo and rlsd out + ref, opd ref + opd (ungated).
    Returns the loss, per-token metric sums (over this rank's response tokens), and the loss split
    into its terms {out, ref, opd} (each already weighted and normalised; they sum to the loss)."""
    T, C, W = args.temperature, args.kl_chunk, weight
    resp, m = mb["resp"], mb["mask"]
    h = response_hidden(model, mb["student"], resp).flatten(0, 1)  # (B*Tr, H), through DDP's forward
    logp = chunked_token_logprobs(h, W, resp.flatten(), T, C).view(resp.shape)  # (B, Tr)
    # past a row's end the log-ratios are set to 0: exp() of an untrained padding position could
    # overflow, and inf * mask 0 is NaN in the gradient
    pad = m == 0
    old_logp = torch.where(pad, logp.detach(), mb["old_logp"])
    ref_logp = torch.where(pad, logp.detach(), mb["ref_logp"])
    adv = mb["adv"] if mb["adv"].dim() == 2 else mb["adv"][:, None]  # (B, Tr) or (B, 1)
    l_out, clipped = clipped_surrogate(logp, old_logp, adv, args.clip_low, args.clip_high, args.dual_clip)
    l_ref = ref_penalty(logp, ref_logp, args.kl_mode)
    per_token = {"out": l_out} if args.algo != "opd" else {}  # opd: no verifier term
    per_token["ref"] = args.alpha * l_ref  # each (B, Tr)
    sums = {}
    if args.algo in ("sdpg", "opd"):
        kl = fused_reverse_kl(h, mb["h_teacher"].flatten(0, 1), W, T, C).view(resp.shape)  # (B, Tr)
        kl_used = kl
        if args.kl_cap > 0:  # min(KL, 20) per token, no gradient where capped (dp_actor.py:632)
            kl_used = torch.clamp(kl_used, max=args.kl_cap)
        if args.opd_exclude_eot:  # (core_algos.py:213-229, 299-300)
            kl_used = kl_used * ~mb["is_eot"]
        positive = args.algo == "sdpg" and args.opd_gate == "positive"  # opd has no advantage to gate on
        pos = (adv > 0).float().expand_as(kl)  # the rollouts the positive gate keeps
        gate = pos if positive else torch.ones_like(pos)
        per_token["opd"] = beta * gate * kl_used
        sums = {"loss_opd": gate * kl_used, "kl_teacher": kl, "kl_teacher_eot": kl * mb["is_eot"],
                "kl_teacher_wrong": kl * mb["first_wrong"], "kl_teacher_pos": kl * pos, "tokens_pos": pos}
    # token-mean over the global mini-batch: sum over this rank's response tokens, divided by the
    # response tokens of all ranks; times world_size because DDP averages gradients over ranks
    terms = {k: (v * m).sum() * world_size / n_tokens_global for k, v in per_token.items()}
    loss = sum(terms.values())
    with torch.no_grad():
        log_w = logp - ref_logp
        sums.update({"loss": sum(per_token.values()), "loss_out": l_out, "loss_ref": l_ref,
                     "kl_ref": torch.exp(-log_w) - 1 + log_w, "entropy": chunked_entropy(h, W, T, C).view(resp.shape),
                     "clip_frac": clipped.float()})
        sums = {k: (v.detach() * m).sum() for k, v in sums.items()}
    return loss, sums, terms


# -----------------------------------------------------------------------------
# config: every default in one place; each is a flag of the same name

parser = argparse.ArgumentParser(description="SDPG on a toy arithmetic task")
# I/O
parser.add_argument("--out_dir", type=str, default="out", help="sft.pt, ckpt.pt and log.jsonl go here")
parser.add_argument("--resume", type=str, default="", help="continue RL from this ckpt.pt")
parser.add_argument("--eval_every", type=int, default=50, help="RL steps between evaluations (0: start and end only)")
parser.add_argument("--eval_size", type=int, default=1000, help="held-out problems per evaluation")
parser.add_argument("--eval_samples", type=int, default=4, help="temperature-1 samples per held-out problem for "
                    "mean@n and pass@k (0: greedy only)")
parser.add_argument("--seed", type=int, default=0, help="seeds model init, data and sampling")
parser.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda | cuda:N")
parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
parser.add_argument("--dtype", type=str, default=None, choices=["float32", "bfloat16"], help="autocast precision "
                    "(default: bfloat16 on CUDA, float32 on CPU)")
parser.add_argument("--kl_chunk", type=int, default=0, help="response tokens per chunk of the lm_head in the loss "
                    "(0: auto, one fp32 (chunk, V) block of about 24 MB)")
parser.add_argument("--digits", type=int, default=2, help="operand digits of the addition task (1 to 6)")
parser.add_argument("--tokenizer", type=str, default="bytes", help="bytes (built in) or a tiktoken name such as gpt2")
parser.add_argument("--context", type=str, default="answer", choices=CONTEXTS,
                    help="what the teacher view's privileged context holds: the answer, the carries, the answer with "
                    "half its digits hidden, the answer with one digit wrong at chance --context_noise, or another "
                    "problem's answer (data.context_text); warm start and RL alike")
parser.add_argument("--context_noise", type=float, default=0.0, help="with --context noisy: the chance that c has one wrong digit")
# model
parser.add_argument("--n_layer", type=int, default=4, help="transformer blocks")
parser.add_argument("--n_head", type=int, default=4, help="attention heads")
parser.add_argument("--n_embd", type=int, default=128, help="width")
# stage 1: supervised warm start of both views
parser.add_argument("--sft_steps", type=int, default=2000, help="most warm-start steps (0 skips the stage)")
parser.add_argument("--sft_batch", type=int, default=64, help="problems per warm-start step, all ranks together")
parser.add_argument("--sft_lr", type=float, default=1e-3, help="warm-start AdamW learning rate")
parser.add_argument("--sft_hint_frac", type=float, default=0.5, help="fraction of warm-start problems shown with c")
parser.add_argument("--sft_until", type=float, default=0.2, help="end the warm start once the student view solves this "
                    "fraction of a validation set (0: run all --sft_steps)")
parser.add_argument("--sft_teacher_until", type=float, default=None, help="... and the teacher view this fraction "
                    "(default: 0.9 with --context answer, else 0: the other contexts stop on the student alone)")
# stage 2: RL
parser.add_argument("--rl_steps", type=int, default=300, help="RL steps (rollout batches)")
parser.add_argument("--algo", type=str, default="sdpg", choices=["sdpg", "grpo", "rlsd", "opd"], help="grpo: no "
                    "distillation term; rlsd: the teacher reweights the advantage instead; opd: distillation alone")
parser.add_argument("--prompts_per_step", type=int, default=32, help="prompts per rollout batch, all ranks together")
parser.add_argument("--group_size", type=int, default=8, help="G, responses sampled per prompt")
parser.add_argument("--num_minibatches", type=int, default=2, help="optimizer updates per rollout batch")
parser.add_argument("--lr", type=float, default=1e-4, help="RL AdamW learning rate")
parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (both stages)")
parser.add_argument("--grad_clip", type=float, default=1.0, help="max global grad norm (0: off)")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollouts")
parser.add_argument("--max_new_tokens", type=int, default=8, help="longest response")
# the recipe: --recipe sets each flag below that reads "recipe"; a flag given explicitly wins
parser.add_argument("--recipe", type=str, default="paper", choices=["paper", "release"], help="the paper's section 4.1 "
                    "configuration, or the released script's (see the docstring)")
parser.add_argument("--clip_low", type=float, default=None, help="eps_low of the PPO clip (recipe: 0.2)")
parser.add_argument("--clip_high", type=float, default=None, help="eps_high (recipe: paper 0.2, release 0.28)")
parser.add_argument("--dual_clip", type=float, default=None, help="c of the dual clip for A < 0 (recipe: 10)")
parser.add_argument("--beta", type=float, default=0.05, help="weight of the self-distillation term (peak of the schedule)")
parser.add_argument("--beta_warmup", type=float, default=None, help="T_warm: steps of linear beta warm-up, 0 off "
                    "(recipe: paper rl_steps/8, release 0)")
parser.add_argument("--beta_decay", type=float, default=None, help="T_decay: final steps of linear beta decay, 0 off "
                    "(recipe: paper 7*rl_steps/8, release 0)")
parser.add_argument("--opd_gate", type=str, default=None, choices=["positive", "all"], help="distil on A>0 rollouts "
                    "or on all (recipe: paper positive, release all)")
parser.add_argument("--kl_cap", type=float, default=None, help="cap of the per-token distillation KL, 0 off (recipe: 20)")
parser.add_argument("--opd_exclude_eot", action="store_true", help="no distillation KL on end-of-text tokens (official "
                    "option, off by default)")
parser.add_argument("--kl_in_reward", type=float, default=None, help="coefficient of the k1 KL-to-reference penalty "
                    "subtracted from the reward (official GRPO; recipe: 0, grpo 1e-3)")
parser.add_argument("--teacher", type=str, default="current", choices=["current", "frozen"], help="weights of the "
                    "teacher view: current (the model being trained, as the paper) or frozen (pi_ref, the warm start)")
parser.add_argument("--rlsd_lambda", type=float, default=0.5, help="RLSD: initial mixing weight lambda of the "
                    "teacher-reweighted advantage")
parser.add_argument("--rlsd_decay", type=int, default=50, help="RLSD: lambda decays linearly to 0 over these steps (0: constant)")
parser.add_argument("--rlsd_clip", type=float, default=0.2, help="RLSD: the token weight is clipped to [1 - this, 1 + this]")
parser.add_argument("--filter_groups", action="store_true", help="DAPO dynamic sampling: drop groups whose rewards are "
                    "all equal and sample more prompts in their place")
parser.add_argument("--max_gen_batches", type=int, default=10, help="with --filter_groups: most rollout batches per step; "
                    "if still short, the batch is filled with dropped groups")
parser.add_argument("--alpha", type=float, default=None, help="weight of the reference penalty (recipe: 1e-3, "
                    "grpo and rlsd 0)")
parser.add_argument("--diag_every", type=int, default=20, help="RL steps between loss diagnostics: per-term gradient "
                    "norms, KL estimators vs exact (0: off)")
parser.add_argument("--max_bad_steps", type=int, default=3, help="stop after this many RL steps in a row with a "
                    "non-finite loss or gradient (each such update is skipped)")
parser.add_argument("--debug_nan_at", type=int, default=-1, help="testing aid: poison the loss from this RL step on")
parser.add_argument("--kl_mode", type=str, default="urkl", choices=["urkl", "ufkl", "rkl", "fkl"], help="form of the reference penalty")
parser.error = die  # argparse's own errors (unknown flag, bad choice) become one line too

# Each recipe is a whole configuration, read from the official code (docstring: the repository
# and commit). The schedule lengths are fractions of --rl_steps: the paper's 50 and 350 of 400.
RECIPES = {
    # the paper's section 4.1 (gate, T_warm 50 and T_decay 350 of T = 400, clip 0.2/0.2); the dual clip
    # and the KL cap, on which the paper is silent, as the released code
    "paper": dict(opd_gate="positive", beta_warmup=1 / 8, beta_decay=7 / 8, clip_low=0.2, clip_high=0.2,
                  dual_clip=10.0, kl_cap=20.0, alpha=1e-3, kl_in_reward=0.0),
    # run_qwen3_4b_sdpg_boxed.sh:42-48 (beta, alpha, schedule off, gate off, urkl), :60-61 (clip),
    # :152 (dual clip); the cap is dp_actor.py:632
    "release": dict(opd_gate="all", beta_warmup=0.0, beta_decay=0.0, clip_low=0.2, clip_high=0.28,
                    dual_clip=10.0, kl_cap=20.0, alpha=1e-3, kl_in_reward=0.0),
}
BASELINES = {  # the official baseline scripts' settings, whatever the recipe
    # run_qwen3_4b_grpo_original_boxed.sh:35-43: clip 0.2/0.2, c = 1000, no KL loss, k1 KL 1e-3 in the reward
    "grpo": dict(clip_low=0.2, clip_high=0.2, dual_clip=1000.0, alpha=0.0, kl_in_reward=1e-3),
    # run_qwen3_4b_rlsd_boxed.sh leaves the clip at verl's defaults (actor.yaml:36-42, 112): 0.2/0.2, c = 3
    "rlsd": dict(clip_low=0.2, clip_high=0.2, dual_clip=3.0, alpha=0.0, kl_in_reward=0.0),
}


def resolve(args):
    """Fill every flag left at None from the algorithm's official settings, then the recipe (and
    the warm start's teacher bar from the context)."""
    settings = {**RECIPES[args.recipe], **BASELINES.get(args.algo, {}),
                "sft_teacher_until": 0.9 if args.context == "answer" else 0.0}
    for k, v in settings.items():
        if getattr(args, k) is None:
            setattr(args, k, v * args.rl_steps if k in ("beta_warmup", "beta_decay") else v)
    return args


# -----------------------------------------------------------------------------
# the run: setup, stage 1 (warm start), stage 2 (RL with SDPG)

if __name__ == "__main__":
    args = resolve(parser.parse_args())
    validate(args)
    try:
        enc = get_encoding(args.tokenizer)
        task = AdditionTask(args.digits, args.eval_size, args.context, args.context_noise)  # the interface: data.py
        _, teacher0, target0 = encode_batch(enc, task, task.eval_set[:1], np.random.default_rng(0))
    except ValueError as e:
        die(str(e))
    if args.max_new_tokens < len(target0[0]):
        die(f"--max_new_tokens must be >= {len(target0[0])}: the answer and end-of-text")

    rank, local_rank, world_size, device, use_cuda = setup_distributed(args)
    ddp, master = dist.is_initialized(), rank == 0  # under torchrun, even with one process
    args.dtype = args.dtype or ("bfloat16" if use_cuda else "float32")  # the config record logs what ran
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    per_rank, rem = divmod(args.prompts_per_step, world_size * args.num_minibatches)
    if per_rank == 0 or rem or args.sft_batch % world_size:
        die(f"--prompts_per_step {args.prompts_per_step} must split evenly over {world_size} ranks x "
            f"{args.num_minibatches} mini-batches, and --sft_batch {args.sft_batch} over the ranks")
    P = args.prompts_per_step // world_size  # prompts per rank per step
    G = args.group_size
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        log = JsonlLog(os.path.join(args.out_dir, "log.jsonl"), append=bool(args.resume), master=master)
    except OSError as e:
        die(f"--out_dir {args.out_dir}: {e.strerror}")
    stop = StopRequest()  # Ctrl-C: finish the step, save, exit
    log({"phase": "config", **vars(args), "world_size": world_size, "device": str(device),
         "torch": torch.__version__, "tiktoken": tiktoken.__version__, "numpy": np.__version__,
         "python": platform.python_version()})

    # the model; the same seed on every rank gives identical initial weights
    torch.manual_seed(args.seed)
    model_args = dict(block_size=len(teacher0[0]) + max(args.max_new_tokens, len(target0[0])), vocab_size=enc.n_vocab,
                      n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(GPTConfig(**model_args)).to(device)
    print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | vocab {enc.n_vocab} | "
           f"device {device} | world {world_size}")

    # -------------------------------------------------------------------------
    # stage 1: supervised warm start of both views (plumbing.warm_start), cached in sft.pt

    sft_path = os.path.join(args.out_dir, "sft.pt")
    sft_key = {k: getattr(args, k) for k in ("seed", "tokenizer", "digits", "sft_steps", "sft_batch", "sft_lr",
                                             "sft_hint_frac", "sft_until", "sft_teacher_until", "weight_decay",
                                             "context", "context_noise")}
    sft_key.update(model_args=model_args, world_size=world_size, device=device.type, dtype=args.dtype)
    cached = None
    if not args.resume and os.path.exists(sft_path):
        try:
            cached = load_checkpoint(sft_path, device, ("model", "key"))
        except ValueError as e:
            print0(f"warm start: ignoring {e}")
    if args.resume:
        pass  # the checkpoint holds the model and the reference
    elif cached is not None and cached.get("key") == sft_key:
        model.load_state_dict(cached["model"])
        print0(f"warm start: reusing {sft_path}")
    elif args.sft_steps > 0:
        train_model = DDP(model, device_ids=[local_rank] if use_cuda else None) if ddp else model
        done = warm_start(model, train_model, args, enc, task, sft_path, sft_key, stop, log, device, ctx, rank, world_size)
        del train_model
        if not done:  # interrupted
            if ddp:  # drop the DDP wrapper before tearing the process group down
                gc.collect()
                dist.destroy_process_group()
            raise SystemExit(130)
    if ddp:
        dist.barrier()

    # -------------------------------------------------------------------------
    # stage 2: RL with SDPG

    ref_model = copy.deepcopy(model).eval().requires_grad_(False)  # pi_ref: the frozen warm start
    teacher_model = model if args.teacher == "current" else ref_model  # same weights, other view
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rl_rng = np.random.default_rng([args.seed, rank, 1])  # problems
    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)  # rollout sampling
    start_step = 0
    if args.resume:
        start_step = resume(args.resume, device, model, ref_model, optimizer, model_args, rl_rng, gen, rank, world_size)
    # the gradient passes go through train_model (DDP averages gradients over ranks); every no-grad
    # pass (rollouts, pi_old, pi_ref, teacher, evaluation) uses model itself
    train_model = DDP(model, device_ids=[local_rank] if use_cuda else None) if ddp else model
    if args.compile:
        train_model = torch.compile(train_model)

    def now():  # wall clock for the phase timings; waits for queued GPU work first
        if use_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def run_eval(step):
        acc, teacher_acc = evaluate(model, enc, task, task.eval_set, rank, world_size, args.max_new_tokens, device, ctx)
        n, sampled = args.eval_samples, {}
        if n:
            sampled = sampled_eval(model, enc, task, task.eval_set, rank, world_size, args.max_new_tokens, device, ctx,
                                   n, args.seed + 7919)
        print0(f"eval step {step}/{args.rl_steps} | eval_acc {acc:.3f} | teacher_acc {teacher_acc:.3f}"
               + (f" | mean@{n} {sampled[f'mean@{n}']:.3f} +- {sampled[f'mean@{n}_ci95']:.3f} | "
                  f"pass@{n} {sampled[f'pass@{n}']:.3f}" if n else ""))
        log({"phase": "eval", "step": step, "eval_acc": acc, "teacher_acc": teacher_acc, **sampled})

    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")

    def checkpoint(step):  # every rank calls it
        save_checkpoint(ckpt_path, model, ref_model, optimizer, model_args, step, vars(args), rl_rng, gen, master)

    def rollout_batch():
        """P training problems, G responses to each from the student view (which never holds c), and
        the verifier's rewards: x (P, Tp), cx (P, Tc+Tp), the reference responses y (P, Ty), resp and
        mask (P*G, Tr), rewards (P*G,)."""
        problems = task.sample(rl_rng, P)
        student, teacher, target = encode_batch(enc, task, problems, rl_rng)  # rl_rng draws random contexts
        x = torch.tensor(student, device=device)
        with ctx:
            resp, mask = model.generate(x, args.max_new_tokens, enc.eot_token, G, args.temperature, gen)
        return {"x": x, "cx": torch.tensor(teacher, device=device), "y": torch.tensor(target, device=device),
                "resp": resp, "mask": mask,
                "rewards": torch.tensor(verify(enc, task, resp, problems, G), device=device)}

    run_eval(start_step)
    t_run, bad_streak = time.time(), 0
    for step in range(start_step, args.rl_steps):
        t0 = now()
        k = step + 1  # the official step numbering starts at 1
        beta = beta_schedule(k, args.rl_steps, args.beta, args.beta_warmup, args.beta_decay) if args.algo in ("sdpg", "opd") else 0.0
        lam = args.rlsd_lambda * (max(0.0, 1 - k / args.rlsd_decay) if args.rlsd_decay else 1.0)  # core_algos.py:468-474

        # 1. rollouts from the student view, scored by the verifier (--filter_groups: DAPO dynamic
        # sampling keeps only groups whose rewards differ, sampling more batches for them)
        if args.filter_groups:
            batch, batches = dynamic_sampling(rollout_batch, P, G, args.max_gen_batches, enc.eot_token)
        else:
            batch = rollout_batch()
            batches = [batch]
        x = batch["x"].repeat_interleave(G, 0)  # (P*G, Tp)
        cx = batch["cx"].repeat_interleave(G, 0)  # (P*G, Tc+Tp)
        resp, mask, rewards = batch["resp"], batch["mask"], batch["rewards"]
        wrong = first_wrong(resp, mask, batch["y"].repeat_interleave(G, 0))  # (P*G, Tr), for the logs

        # 2. log-probs of the sampled tokens under pi_old (the rollout weights) and pi_ref; for rlsd
        # the teacher's too, once per rollout batch from the weights that sampled it (ray_trainer.py:1632-1638)
        t_rollout = now() - t0
        with torch.no_grad(), ctx:
            old_logp = sampled_logprobs(model, x[::G], resp, G, args.temperature, args.kl_chunk)  # (P*G, Tr)
            ref_logp = sampled_logprobs(ref_model, x[::G], resp, G, args.temperature, args.kl_chunk)
            if args.algo == "rlsd":
                teacher_logp = sampled_logprobs(teacher_model, cx[::G], resp, G, args.temperature, args.kl_chunk)
        t_logp = now() - t0 - t_rollout

        # 3. group-relative advantages (official GRPO: of the reward less a KL-to-reference penalty;
        # rlsd: reweighted per token by the teacher)
        scores = rewards
        if args.kl_in_reward:
            scores = kl_in_reward_scores(rewards, old_logp, ref_logp, mask, args.kl_in_reward)
        adv = group_advantages(scores, G)  # (P*G,)
        if args.algo == "rlsd":
            adv = rlsd_advantages(adv, teacher_logp, old_logp, lam, args.rlsd_clip)  # (P*G, Tr)

        # 4. several updates per rollout batch, each on a slice of whole groups
        sums, t_teacher, t_update, skipped, diag = {}, 0.0, 0.0, 0, {}
        n_mb = P * G // args.num_minibatches  # rollouts per mini-batch on this rank
        # response tokens of each global mini-batch: one all-reduce for all (every rank calls it, whatever its lengths)
        n_tokens = all_sum(mask.reshape(args.num_minibatches, n_mb, -1).sum((1, 2))).tolist()
        for j in range(args.num_minibatches):
            s = slice(j * n_mb, (j + 1) * n_mb)
            mb = {"student": x[s], "resp": resp[s], "mask": mask[s], "adv": adv[s],
                  "old_logp": old_logp[s], "ref_logp": ref_logp[s], "is_eot": resp[s] == enc.eot_token,
                  "first_wrong": wrong[s]}
            t_a = now()
            # the teacher view: the current weights, no gradient, reading c + x + y (c + x once per prompt)
            if args.algo in ("sdpg", "opd"):
                with torch.no_grad(), ctx:
                    mb["h_teacher"] = teacher_model.score(cx[s][::G], resp[s], G)  # (B, Tr, H)
            t_b = now()
            n_tokens_global = n_tokens[j]
            if j == 0 and args.diag_every and step % args.diag_every == 0:
                with ctx:
                    _, _, terms = minibatch_loss(model, model.lm_head_weight, mb, args, beta, n_tokens_global, world_size)
                    diag = loss_diagnostics(model, ref_model, mb, terms, args, world_size)
            with ctx:
                loss, mb_sums, _ = minibatch_loss(train_model, model.lm_head_weight, mb, args, beta,
                                                  n_tokens_global, world_size)
            if 0 <= args.debug_nan_at <= step:
                loss = loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # the norm is of the gradients DDP already averaged, so every rank takes the same branch
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:  # a non-finite loss or gradient: skip this update, keep the weights and Adam moments
                skipped += 1
            sums = {k: sums.get(k, 0) + v for k, v in mb_sums.items()}
            t_teacher, t_update = t_teacher + t_b - t_a, t_update + now() - t_b

        # 5. log: token-weighted over all ranks for token terms, rollout-weighted for the reward
        names = list(sums)
        generated = torch.cat([b["rewards"] for b in batches])  # every rollout sampled this step
        n_signal = sum(group_has_signal(b["rewards"], G).sum() for b in batches)
        totals = all_sum(torch.stack([sums[k] for k in names] + [n_signal, generated.sum(), torch.tensor(
            float(len(generated)), device=device), mask.sum(), torch.tensor(float(len(rewards)), device=device)])
                         .float()).tolist()
        n_signal, r_sum, n_gen, n_tok, n_roll = totals[-5:]
        dt = now() - t0
        rec = {"phase": "rl", "step": step + 1, "reward": r_sum / n_gen, "signal_frac": n_signal * G / n_gen,
               "gen_batches": n_gen / (P * G * world_size), **{k: v / n_tok for k, v in zip(names, totals)},
               "resp_len": n_tok / n_roll, "beta": beta, **({"rlsd_lambda": lam} if args.algo == "rlsd" else {}),
               "tok_per_s": n_tok / dt, "dt": dt,
               "dt_rollout": t_rollout, "dt_logp": t_logp, "dt_teacher": t_teacher, "dt_update": t_update,
               "skipped": skipped, **diag}
        if "kl_teacher" in names:  # where the distillation KL falls: end-of-text, the first wrong token, A > 0
            t = dict(zip(names, totals))
            rec.update(eot_kl_share=t["kl_teacher_eot"] / max(t["kl_teacher"], 1e-30),
                       wrong_kl_share=t["kl_teacher_wrong"] / max(t["kl_teacher"], 1e-30),
                       kl_teacher_pos=t["kl_teacher_pos"] / max(t["tokens_pos"], 1e-30))  # per token of A > 0 rollouts
        log(rec)
        eta = (time.time() - t_run) / (step + 1 - start_step) * (args.rl_steps - step - 1)
        opd = f"opd {rec['loss_opd']:.3f} | kl_teacher {rec['kl_teacher']:.3f} | " if "kl_teacher" in rec else ""
        print0(f"step {step + 1}/{args.rl_steps} | reward {rec['reward']:.3f} | signal {rec['signal_frac']:.2f} | "
               f"loss {rec['loss']:.4f} | out {rec['loss_out']:.4f} | {opd}ref {rec['loss_ref']:.5f} | "
               f"kl_ref {rec['kl_ref']:.4f} | entropy {rec['entropy']:.3f} | "
               f"len {rec['resp_len']:.2f} | clip {rec['clip_frac']:.3f} | beta {beta:.4g} | "
               f"{rec['tok_per_s']:.0f} tok/s | {dt * 1000:.0f}ms | eta {eta:.0f}s"
               + (f" | skipped {skipped} non-finite updates" if skipped else ""))

        saved = (args.eval_every and (step + 1) % args.eval_every == 0) or step + 1 == args.rl_steps
        if saved:
            run_eval(step + 1)
            checkpoint(step + 1)
        bad_streak = bad_streak + 1 if skipped else 0
        if bad_streak >= args.max_bad_steps:
            kept = f"the last checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was written yet"
            die(f"{bad_streak} RL steps in a row had a non-finite loss or gradient (updates skipped); stopping; "
                f"{kept}; try a lower --lr")
        if stop.any_rank(device):
            print0("interrupted: stopping after this step")
            if not saved:
                checkpoint(step + 1)
            print0(f"stopped after step {step + 1}/{args.rl_steps}; continue with --resume {ckpt_path}")
            break

    if start_step == args.rl_steps:
        checkpoint(start_step)
    if ddp:
        # drop the DDP wrapper (it holds the process group) before tearing the group down; gloo can
        # abort at interpreter exit when a process group outlives destroy_process_group
        del train_model
        gc.collect()
        dist.barrier()  # rank 0 may still be saving
        dist.destroy_process_group()
