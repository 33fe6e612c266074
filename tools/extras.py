"""
What only a study needs, on top of sdpg.py through its one extension point, sdpg.main(argv,
task, hook): other privileged contexts, and per-step diagnostics of the loss. The training loop is
sdpg.py's own; this file adds a task and a hook, never a copy of the loop.

    python tools/extras.py --context noisy --context_noise 0.3 --diag_every 20 [sdpg.py flags]
    python tools/extras.py --task chain --context derivation [sdpg.py flags]

--task addition (sdpg.py's) or chain, a derivation before the answer (tools/chain.py, whose
contexts are answer and derivation, and whose logs are its own).

--ema_rate r: with --teacher ema, the teacher moves r of the way to the model after each optimizer
step instead of sdpg.EMA_RATE (0.05); for a study of the rate. It is not kept in the checkpoint:
resume such a run with --teacher ema --ema_rate r again.

--context (what the teacher's c holds, warm start and RL alike; for 7 + 96, answer 301):
    answer      the answer itself, as sdpg.py                                   301
    hint        the carry into each digit: a solution step, not the answer      011
    partial     the answer with half its digits (rounded down) hidden           3?1
    noisy       the answer, but with chance --context_noise one digit is wrong  391
    irrelevant  another problem's answer, drawn at random                       850
With a context other than the answer, the warm start stops on the student's bar alone
(--sft_teacher_until 0) unless the flag is given.

Logged with every RL step, from its first mini-batch before its update (so the rollouts are
exactly on-policy), when there is a distillation term:
    eot_kl_share, wrong_kl_share  the share of the KL to the teacher on end-of-text tokens, and on
                                  the first token where a rollout departs from the reference answer
    kl_teacher_pos, tokens_pos    the KL per token of rollouts with A > 0, and their share of tokens
and every --diag_every steps d (0: never; at steps 1, 1 + d, 1 + 2d, ...): the gradient norm of
each loss term on its own and the cosine of the outcome and distillation gradients; for the
student-teacher and the policy-reference pairs the exact KL (each side from its own weights and
head) next to the sampled-token estimators k1, k2, k3 (means and stds over the response tokens of
all ranks).
--approx_every d: every d steps, the gradient of each approximation of the distillation term
(tools/approx.py) beside the exact one (tools/exactness.py says which fields).

--kl_approx NAME trains with an approximation in place of the exact KL (the gate, the cap, beta
and the token-mean as before; kl_teacher and loss_opd then log its per-token value): student_K
(the student's top K, renormalised), tail_K (with a tail bucket), teacher_K (the teacher's top K,
renormalised), sampled (the sampled token: SG(log p - log q) log p, whose value is not a KL), or
exact (the exact KL from the full logits, tools/approx.py's, as a control of the substitution).
They form the full (N, V) logits of both views, where sdpg.py's fused term never does.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sdpg  # noqa: E402
import chain  # noqa: E402
import exactness  # noqa: E402
from data import AdditionTask, answer_text, encode_chars  # noqa: E402
import approx  # noqa: E402
from model import chunked_token_logprobs, fused_reverse_kl, head_logits, response_hidden  # noqa: E402

CONTEXTS = ("answer", "hint", "partial", "noisy", "irrelevant")


def carry_text(a, b, digits=2):
    """The carry into each digit of the sum, in the answer's order: 7 + 96 -> '011' (answer
    '301'). The first is always 0 and the last is the answer's last digit; with the carries given,
    each other digit is (a_i + b_i + carry_i) mod 10, one column at a time."""
    return "".join(str(int(a % 10 ** i + b % 10 ** i >= 10 ** i)) for i in range(digits + 1))


def context_text(kind, a, b, digits=2, rng=None, noise=0.0):
    """The privileged context c of problem (a, b), digits + 1 characters whatever the kind (see the
    module docstring); rng (a numpy Generator) draws the chance of partial, noisy, irrelevant."""
    y = answer_text(a, b, digits)
    if kind == "answer":
        return y
    if kind == "hint":
        return carry_text(a, b, digits)
    if kind == "partial":
        hide = rng.choice(digits + 1, size=(digits + 1) // 2, replace=False)
        return "".join("?" if i in hide else ch for i, ch in enumerate(y))
    if kind == "noisy":
        if rng.random() >= noise:
            return y
        i = int(rng.integers(digits + 1))
        wrong = (int(y[i]) + int(rng.integers(1, 10))) % 10  # any digit but the right one
        return y[:i] + str(wrong) + y[i + 1:]
    if kind == "irrelevant":
        while True:
            other = answer_text(*(int(v) for v in rng.integers(0, 10 ** digits, 2)), digits)
            if other != y:
                return other
    raise ValueError(f"unknown context kind {kind!r}")


class ContextTask(AdditionTask):
    """Addition whose privileged context is of another kind (context_text)."""

    def __init__(self, digits=2, eval_size=1000, context="answer", noise=0.0):
        if context not in CONTEXTS:
            raise ValueError(f"--context must be one of {', '.join(CONTEXTS)} (got {context!r})")
        if not 0.0 <= noise <= 1.0 or (noise > 0 and context != "noisy"):
            raise ValueError(f"--context_noise must be in [0, 1], and is read only with --context "
                             f"noisy (got {noise} with --context {context})")
        super().__init__(digits, eval_size)
        self.kind, self.noise = context, noise

    def __repr__(self):
        return f"ContextTask(digits={self.digits}, eval_size={len(self.eval_set)}, " \
               f"context={self.kind!r}, noise={self.noise})"

    def context(self, p, rng):
        return context_text(self.kind, *p, self.digits, rng, self.noise)


# -----------------------------------------------------------------------------
# the hook: where the distillation KL falls, and the loss diagnostics

def first_wrong(resp, mask, target):
    """(B, Tr) bool, True at the first response token that differs from the reference response
    target (B, Ty) (the answer and end-of-text): where a wrong rollout goes wrong. A correct
    rollout has none; stopping early counts as wrong at its end-of-text."""
    n = min(resp.size(1), target.size(1))
    differ = torch.ones_like(mask, dtype=torch.bool)  # past the reference: wrong (or masked)
    differ[:, :n] = resp[:, :n] != target[:, :n]
    differ &= mask.bool()
    return differ & (differ.cumsum(1) == 1)


def kl_estimators(logp, logq):
    """Sampled-token estimators of KL(p || q) from y ~ p, log r = log p(y) - log q(y):
    k1 = log r (unbiased, high variance, can be negative), k2 = 0.5 (log r)^2 (biased, low
    variance), k3 = exp(-log r) - 1 + log r (unbiased, >= 0). Shapes are kept."""
    log_r = logp - logq
    return log_r, 0.5 * log_r ** 2, torch.exp(-log_r) - 1 + log_r


def kl_location(run, mb):
    """eot_kl_share, wrong_kl_share, kl_teacher_pos, tokens_pos over the mini-batch, all ranks."""
    a, G, m = run.args, run.args.group_size, mb.mask
    target = torch.tensor([encode_chars(run.enc, run.task.answer(p)) + [run.enc.eot_token]
                           for p in mb.problems], device=m.device).repeat_interleave(G, 0)
    with torch.no_grad(), run.ctx:
        h = response_hidden(run.model, mb.x, mb.resp, mb.x_pad).flatten(0, 1)
        kl = fused_reverse_kl(h, mb.h_teacher.flatten(0, 1), run.model.lm_head_weight,
                              a.temperature, teacher_weight=mb.w_teacher).view(m.shape) * m
    adv = mb.adv if mb.adv.dim() == 2 else mb.adv[:, None]
    pos = (adv > 0).float().expand_as(kl) * m
    s = sdpg.all_sum(torch.stack([kl.sum(), (kl * mb.is_eot).sum(), (kl * first_wrong(
        mb.resp, m, target)).sum(), (kl * pos).sum(), pos.sum(), m.sum()]).double()).tolist()
    return {"eot_kl_share": s[1] / max(s[0], 1e-30), "wrong_kl_share": s[2] / max(s[0], 1e-30),
            "kl_teacher_pos": s[3] / max(s[4], 1e-30), "tokens_pos": s[4] / s[5]}


def loss_diagnostics(run, beta_k, mb):
    """Each term's gradient norm on its own (of the unwrapped model, averaged over ranks like
    DDP's), the out/opd cosine, and for the student-teacher and policy-reference pairs the exact KL
    next to k1, k2, k3 (mean and std over the response tokens of all ranks). Touches no .grad."""
    model, a, ws = run.model, run.args, run.world_size
    params = [p for p in model.parameters() if p.requires_grad]
    out, grads = {}, {}
    n_tokens = sdpg.all_sum(mb.mask.sum()).item()  # the global mini-batch's, as update() counts
    with run.ctx:
        _, _, terms = sdpg.minibatch_loss(model, model.lm_head_weight, mb, n_tokens, a, beta_k, ws)
    # the gradients, norms and cosine in fp32 outside autocast, as loss.backward() runs
    with torch.autocast(params[0].device.type, enabled=False):
        for k, term in terms.items():
            grads[k] = exactness.flat_grad(term, params, ws)  # averaged over ranks, as DDP does
            out[f"grad_norm_{k}"] = grads[k].norm().item()
        if "opd" in grads and "out" in grads and min(grads["opd"].norm(), grads["out"].norm()) > 0:
            out["grad_cos_out_opd"] = (grads["out"] @ grads["opd"] / (
                grads["out"].norm() * grads["opd"].norm())).item()
    with torch.no_grad(), run.ctx:
        tau, W, m, G = a.temperature, model.lm_head_weight, mb.mask, a.group_size
        h = response_hidden(model, mb.x, mb.resp, mb.x_pad).flatten(0, 1)
        logp = chunked_token_logprobs(h, W, mb.resp.flatten(), tau)
        # each pair's other side from its own weights and head (pi_ref's, or the teacher's)
        x_pad = sdpg.per_prompt(mb.x_pad, G)
        pairs = {"ref": (run.ref_model.shared_prefix_hidden(mb.x[::G], mb.resp, G, x_pad).flatten(0, 1),
                         run.ref_model.lm_head_weight)}
        if mb.h_teacher is not None:
            pairs["teacher"] = (mb.h_teacher.flatten(0, 1), mb.w_teacher)
        for name, (h_other, w_other) in pairs.items():
            exact = fused_reverse_kl(h, h_other, W, tau, teacher_weight=w_other)
            logq = chunked_token_logprobs(h_other, w_other, mb.resp.flatten(), tau)
            for est, v in zip(("exact", "k1", "k2", "k3"), (exact, *kl_estimators(logp, logq))):
                v = v.view(m.shape)
                s = sdpg.all_sum(torch.stack([(v * m).sum(), (v * v * m).sum(), m.sum()]).double())
                mean = (s[0] / s[2]).item()
                out[f"{est}_{name}"] = mean
                out[f"{est}_{name}_std"] = max(0.0, (s[1] / s[2]).item() - mean ** 2) ** 0.5
    return out


def use_kl_approximation(spec):
    """Put tools/approx.py's form named spec (see the docstring) in place of model.fused_reverse_kl
    in sdpg.minibatch_loss, for this process. The sampled token reads the tokens minibatch_loss is
    scoring: a wrapper of minibatch_loss hands them over. Nothing else of the loop changes."""
    name, _, k = spec.partition("_")
    forms = {"student": approx.topk_student_renorm, "tail": approx.topk_student_tail,
             "teacher": approx.topk_teacher_renorm}
    plain = name in ("exact", "sampled") and k == ""
    if not (plain or (name in forms and k.isdigit() and int(k) > 0)):
        sdpg.die(f"--kl_approx {spec}: use exact, sampled, or student_K, tail_K, teacher_K (K >= 1)")
    scored = {}
    real_minibatch_loss = sdpg.minibatch_loss

    def minibatch_loss(model, weight, mb, *rest):
        scored["tokens"] = mb.resp.flatten()  # (B*Tr,), the rows of h in minibatch_loss
        return real_minibatch_loss(model, weight, mb, *rest)

    def kl_term(h, h_teacher, weight, temperature=1.0, chunk_size=0, teacher_weight=None):
        zs = head_logits(h, weight)  # (N, V), with gradient
        zt = head_logits(h_teacher, weight if teacher_weight is None else teacher_weight).detach()
        if name == "exact":
            return approx.exact_reverse_kl(zs, zt, temperature)
        if name == "sampled":
            return approx.sampled_token(zs, zt, scored["tokens"], temperature)
        return forms[name](zs, zt, min(int(k), zs.size(-1)), temperature)
    sdpg.minibatch_loss = minibatch_loss
    sdpg.fused_reverse_kl = kl_term


def make_hook(diag_every, where=None, approx_every=0):
    """hook(run, k, beta_k, mb) for sdpg.main: where(run, k, mb) (the KL location of addition by
    default) every step, diagnostics every diag_every steps (the first included), and the
    approximations' gradients beside the exact one every approx_every steps (tools/exactness.py)."""
    def hook(run, k, beta_k, mb):
        if where is not None:
            rec = where(run, k, mb)
        else:
            rec = kl_location(run, mb) if mb.h_teacher is not None else {}
        if diag_every and (k - 1) % diag_every == 0:
            rec.update(loss_diagnostics(run, beta_k, mb))
        if approx_every and (k - 1) % approx_every == 0 and mb.h_teacher is not None:
            rec.update(exactness.approx_gradients(run, k, mb))
        return rec
    return hook


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--task", default="addition", choices=["addition", "chain"])
    p.add_argument("--context", default="answer", help=", ".join(CONTEXTS))
    p.add_argument("--context_noise", type=float, default=0.0)
    p.add_argument("--diag_every", type=int, default=0)
    p.add_argument("--ema_rate", type=float, default=None)
    p.add_argument("--approx_every", type=int, default=0)
    p.add_argument("--kl_approx", default=None)
    p.error = sdpg.die  # one line, as sdpg.py's
    if {"-h", "--help"} & set(argv if argv is not None else sys.argv[1:]):
        print(__doc__.strip() + "\n\nThe flags of sdpg.py:\n")  # then sdpg.py's --help
    ours, rest = p.parse_known_args(argv)
    if ours.task == "addition" and ours.context != "answer" and \
            not any(a.startswith("--sft_t") for a in rest):
        rest += ["--sft_teacher_until", "0"]  # a teacher bar only for the exact answer
    if ours.task == "chain" and not any(a.startswith("--max_new") for a in rest):
        rest += ["--max_new_tokens", "15"]  # the longest response and its end-of-text
    try:
        d = sdpg.parser.parse_known_args(rest)[0]  # the task's size, as sdpg.py reads it
        task = ContextTask(d.digits, d.eval_size, ours.context, ours.context_noise) \
            if ours.task == "addition" else chain.ChainTask(d.eval_size, ours.context)
    except ValueError as e:
        sdpg.die(str(e))
    if ours.diag_every < 0 or ours.approx_every < 0:
        sdpg.die("--diag_every and --approx_every must be >= 0")
    if ours.ema_rate is not None:
        if not (0 < ours.ema_rate <= 1 and d.teacher == "ema"):
            sdpg.die("--ema_rate must be in (0, 1] and is read only with --teacher ema")
        sdpg.EMA_RATE = ours.ema_rate
    if ours.kl_approx is not None:
        use_kl_approximation(ours.kl_approx)
    if ours.task == "chain" and ours.context_noise:
        sdpg.die("--context_noise is read only with --task addition --context noisy")
    if ours.task == "addition":
        return sdpg.main(rest, task=task, hook=make_hook(ours.diag_every, None, ours.approx_every))
    every = d.eval_every
    hook = make_hook(ours.diag_every, chain.make_where(every), ours.approx_every)
    run = sdpg.main(rest, task=task, hook=hook)
    if run.rank == 0 and not run.stopped:  # the final weights, rank 0 alone
        run.log({"phase": "chain", "step": run.args.rl_steps, **chain.greedy_metrics(run, False)})
    return run


if __name__ == "__main__":
    main()
