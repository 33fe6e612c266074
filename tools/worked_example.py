"""
One group of one RL step, every number printed: the problem, its G rollouts, their rewards and
advantages, which rollouts the positive gate keeps, per token the student's p, the teacher's q and
the exact KL(p || q), and the value of each loss term. Also what the stop-gradient on the teacher
removes: the part of the distillation gradient that would move the teacher view instead.

    python tools/worked_example.py out/sft.pt            # 7 + 96, the README's example
    python tools/worked_example.py out/sft.pt --figure results/worked_example.png
    python tools/worked_example.py out/ckpt.pt --a 38 --b 45 --seed 1

--figure draws the same group as one picture (needs matplotlib): per rollout and token the
student's p, the teacher's q and the KL, with the rollouts the gate keeps marked.

The checkpoint is used as pi_theta, pi_old and pi_ref alike, as at the first update of RL: the ratio
is 1 and the reference penalty 0. Recipe flags of sdpg.py (--recipe, --opd_gate, --beta, ...) may follow.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import sdpg  # noqa: E402
from data import AdditionTask, decode_response, encode_batch, get_encoding  # noqa: E402
from model import chunked_token_logprobs, response_hidden  # noqa: E402
from passk import load_model  # noqa: E402  (tools/passk.py's checkpoint reader)


def worked_example(model, enc, task, problem, args, seed):
    """Everything the README's worked example shows, as a dict of plain Python values."""
    G, T = args.group_size, args.temperature
    student, teacher, target = encode_batch(enc, task, [problem], np.random.default_rng(seed))
    x, cx = torch.tensor(student), torch.tensor(teacher)
    gen = torch.Generator().manual_seed(seed)
    resp, mask = model.generate(x, args.max_new_tokens, enc.eot_token, G, T, gen)
    texts = [decode_response(enc, r) for r in resp.tolist()]
    rewards = torch.tensor([task.reward(t, problem) for t in texts])
    adv = sdpg.group_advantages(rewards, G)
    W = model.lm_head_weight
    with torch.no_grad():
        hs = model.shared_prefix_hidden(x, resp, G)  # (G, Tr, H) student view
        ht = model.shared_prefix_hidden(cx, resp, G)  # teacher view, same tokens
        logp = chunked_token_logprobs(hs.flatten(0, 1), W, resp.flatten(), T).view(resp.shape)
        logq = chunked_token_logprobs(ht.flatten(0, 1), W, resp.flatten(), T).view(resp.shape)
        kl = sdpg.full_vocab_reverse_kl(hs @ W.T / T, ht @ W.T / T)  # (G, Tr)
    n_tok = mask.sum().item()
    mb = sdpg.Batch([problem], x.repeat_interleave(G, 0), None, cx.repeat_interleave(G, 0), None,
                    resp, mask, resp == enc.eot_token, rewards, old_logp=logp, ref_logp=logp, adv=adv,
                    h_teacher=ht, w_teacher=W.detach())
    loss, _, terms = sdpg.minibatch_loss(model, W, mb, n_tok, args, args.beta, 1)
    params = [p for p in model.parameters()]
    term_grad = {}
    for k, v in terms.items():  # each term's gradient norm: a term can be 0 and still move the weights
        g = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
        term_grad[k] = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)]).norm().item()

    # the stop-gradient: d KL / d theta through the student side (what SDPG uses) and through the
    # teacher side (what a loss without SG would add), on the tokens the gate keeps
    gate = (adv > 0).float()[:, None] * mask if args.opd_gate == "positive" else mask
    zs = response_hidden(model, mb.x, resp) @ model.lm_head_weight.T / T
    zt = response_hidden(model, cx.repeat_interleave(G, 0), resp) @ model.lm_head_weight.T / T
    side = {}
    for name, (a, b) in {"student": (zs, zt.detach()), "teacher": (zs.detach(), zt)}.items():
        lp, lq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        k = ((lp.exp() * (lp - lq)).sum(-1) * gate).sum() / n_tok
        g = torch.autograd.grad(k, params, allow_unused=True)
        side[name] = torch.cat([(v if v is not None else torch.zeros_like(p)).flatten() for v, p in zip(g, params)])
    norms = side["student"].norm() * side["teacher"].norm()
    cos = (side["student"] @ side["teacher"] / norms).item() if norms > 0 else float("nan")
    rows = []
    for i in range(G):
        toks = []
        for t in range(int(mask[i].sum())):
            tok = resp[i, t].item()
            toks.append({"token": "<eot>" if tok == enc.eot_token else enc.decode([tok]),
                         "p": logp[i, t].exp().item(), "q": logq[i, t].exp().item(), "kl": kl[i, t].item()})
        rows.append({"text": texts[i], "reward": rewards[i].item(), "adv": adv[i].item(),
                     "gated_in": bool(adv[i] > 0) if args.opd_gate == "positive" else True, "tokens": toks})
    return {"prompt": enc.decode(student[0]), "context": task.context(problem, np.random.default_rng(seed)), "answer": task.answer(problem),
            "rollouts": rows, "n_tokens": n_tok, "loss": loss.item(), "terms": {k: v.item() for k, v in terms.items()},
            "term_grad_norms": term_grad,
            "grad_norm_student_side": side["student"].norm().item(),
            "grad_norm_teacher_side": side["teacher"].norm().item(), "grad_cos_sides": cos}


def figure(ex, args, path):
    """The group as one picture: a row per rollout, a column per token, each cell the token with
    p / q under it, shaded by the KL; the rollouts the gate keeps are marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = ex["rollouts"]
    width = max(len(r["tokens"]) for r in rows)
    kl = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        kl[i, :len(r["tokens"])] = [t["kl"] for t in r["tokens"]]
    fig, ax = plt.subplots(figsize=(2.2 + 1.5 * width, 0.7 + 0.55 * len(rows)))
    im = ax.imshow(kl, cmap="Oranges", vmin=0, aspect="auto")
    for i, r in enumerate(rows):
        for t, tok in enumerate(r["tokens"]):
            text = tok["token"] if tok["token"].isprintable() else repr(tok["token"])[1:-1]
            ax.text(t, i, f"{text}\n{tok['p']:.2f} / {tok['q']:.2f}", ha="center", va="center",
                    fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{i}: A {r['adv']:+.2f}" + ("  distilled" if r["gated_in"] else "")
                                     for i, r in enumerate(rows)], fontsize=8)
    ax.set_xticks(range(width), [f"token {t + 1}" for t in range(width)], fontsize=8)
    ax.set_title(f"{ex['prompt']} (answer {ex['answer']} reversed): token, student p / teacher q; "
                 f"shade: KL(p||q); gate {args.opd_gate}", fontsize=9)
    fig.colorbar(im, ax=ax, label="KL(p || q) at the position")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(ex, args):
    out = [f"Problem `{ex['prompt']}`, answer `{ex['answer']}` (reversed), teacher context `{ex['context']}`; "
           f"G = {args.group_size}, gate `{args.opd_gate}`, beta {args.beta}, alpha {args.alpha}.", "",
           "| rollout | response | reward | advantage | distilled | per token: token p / q / KL(p‖q) |",
           "|---|---|---|---|---|---|"]
    for i, r in enumerate(ex["rollouts"]):
        toks = "; ".join(f"`{t['token']}` {t['p']:.2f} / {t['q']:.2f} / {t['kl']:.3f}" for t in r["tokens"])
        out.append(f"| {i} | `{r['text']}` | {r['reward']:.0f} | {r['adv']:+.3f} | {'yes' if r['gated_in'] else 'no'} | {toks} |")
    t = ex["terms"]
    out += ["", f"Loss over the group's {ex['n_tokens']:.0f} response tokens: L_out {t.get('out', 0):+.5f}, "
                f"beta * L_OPD {t.get('opd', 0):+.5f}, alpha * L_ref {t.get('ref', 0):+.5f}, total {ex['loss']:+.5f}; "
                f"gradient norms " + ", ".join(f"{k} {v:.4f}" for k, v in ex["term_grad_norms"].items()) + ".",
            f"Gradient of the gated KL: through the student {ex['grad_norm_student_side']:.4f}; through the teacher, "
            f"were it not detached, {ex['grad_norm_teacher_side']:.4f} more, at cosine {ex['grad_cos_sides']:+.2f} "
            f"to the student side."]
    return "\n".join(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="one group of one RL step, every number")
    p.add_argument("ckpt", help="sft.pt or ckpt.pt written by sdpg.py")
    p.add_argument("--a", type=int, default=7)
    p.add_argument("--b", type=int, default=96)
    p.add_argument("--seed", type=int, default=None, help="seed of the rollout sampling (default: the first of 0, 1, "
                   "2, ... whose group has both correct and wrong rollouts)")
    p.add_argument("--figure", default="", help="also draw the group to this PNG (needs matplotlib)")
    mine, rest = p.parse_known_args()
    try:
        model, _, _ = load_model(mine.ckpt)
    except ValueError as e:
        sys.exit(f"worked_example.py: error: {e}")
    args = sdpg.resolve(sdpg.parser.parse_args(rest))
    enc = get_encoding()
    digits = (model.config.block_size - args.max_new_tokens - 5) // 3  # c + x: 2d + 2 + d + 3
    task = AdditionTask(digits, eval_size=1)
    if not all(0 <= v < 10 ** task.digits for v in (mine.a, mine.b)):
        sys.exit(f"worked_example.py: error: operands must have at most {task.digits} digits (the checkpoint's task)")
    for seed in [mine.seed] if mine.seed is not None else range(100):
        ex = worked_example(model, enc, task, (mine.a, mine.b), args, seed)
        if mine.seed is not None or 0 < sum(r["reward"] for r in ex["rollouts"]) < args.group_size:
            break
    print(f"(rollout seed {seed})\n" + markdown(ex, args))
    if mine.figure:
        print(f"figure: {figure(ex, args, mine.figure)}")
