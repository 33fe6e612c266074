"""
Where does the privileged teacher disagree with the student? For one problem, print the student's
response token by token with p(token) under the student view, q(token) under the teacher view
(which also reads the answer), and the exact full-vocabulary KL(p || q) at that position: the
per-token signal the SDPG distillation term trains on.

    python tools/teacher_signal.py out/ckpt.pt 7 96              # greedy response to 07+96=
    python tools/teacher_signal.py out/ckpt.pt 7 96 --sample 3   # three samples at the run's temperature
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
from data import AdditionTask, decode_response, encode_batch, get_encoding  # noqa: E402
from model import chunked_token_logprobs, fused_reverse_kl  # noqa: E402
from passk import load_model  # noqa: E402  (tools/passk.py's checkpoint reader)


def signal_table(model, enc, task, a, b, resp, temperature=1.0, seed=0):
    """Rows (token text, p, q, KL) for each response token of resp (Tr,) up to its end-of-text;
    the teacher's context is the task's kind, drawn with seed where it involves chance."""
    student, teacher, _ = encode_batch(enc, task, [(a, b)], np.random.default_rng(seed))
    x, cx, y = torch.tensor(student), torch.tensor(teacher), resp[None]
    W = model.lm_head_weight
    with torch.no_grad():
        hs = model.shared_prefix_hidden(x, y).flatten(0, 1)  # (Tr, H), the student view
        ht = model.shared_prefix_hidden(cx, y).flatten(0, 1)  # the teacher view, same tokens
        logp = chunked_token_logprobs(hs, W, y.flatten(), temperature)  # the policy is softmax(z / T)
        logq = chunked_token_logprobs(ht, W, y.flatten(), temperature)
        kl = fused_reverse_kl(hs, ht, W, temperature)
    rows = []
    for t, tok in enumerate(y.flatten().tolist()):
        text = "<eot>" if tok == enc.eot_token else repr(enc.decode([tok]))[1:-1]
        rows.append((text, logp[t].exp().item(), logq[t].exp().item(), kl[t].item()))
        if tok == enc.eot_token:
            break
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="per-token teacher signal of one problem")
    p.add_argument("ckpt", help="a ckpt.pt (or sft.pt) written by sdpg.py")
    p.add_argument("a", type=int)
    p.add_argument("b", type=int)
    p.add_argument("--sample", type=int, default=0, help="samples at the run's temperature instead of the greedy response")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        model, ckpt, cfg = load_model(args.ckpt)
    except ValueError as e:
        sys.exit(f"teacher_signal.py: error: {e}")
    enc, max_new = get_encoding(), cfg.get("max_new_tokens", 8)
    digits = cfg.get("digits", (model.config.block_size - max_new - 5) // 3)  # c + x: 3d + 5 tokens
    if not (0 <= args.a < 10 ** digits and 0 <= args.b < 10 ** digits):
        sys.exit(f"teacher_signal.py: error: operands must have at most {digits} digits (the checkpoint's task)")
    task = AdditionTask(digits, 1)
    student = encode_batch(enc, task, [(args.a, args.b)], np.random.default_rng(args.seed))[0]
    answers = [task.answer((args.a, args.b))]
    T = cfg.get("temperature", 1.0)
    gen = torch.Generator().manual_seed(args.seed)
    resp, _ = model.generate(torch.tensor(student), max_new, enc.eot_token, max(1, args.sample),
                             T if args.sample else 0, gen)
    print(f"problem {enc.decode(student[0])}  answer {answers[0]}  (checkpoint step {ckpt.get('step', 'warm start')})")
    for r in resp:
        text = decode_response(enc, r.tolist())
        print(f"\nresponse {text!r}: reward {task.reward(text, (args.a, args.b)):.0f}")
        print(f"{'token':>8} {'p (student)':>12} {'q (teacher)':>12} {'KL(p||q)':>10}")
        for tok, pt, qt, kl in signal_table(model, enc, task, args.a, args.b, r, T, args.seed):
            print(f"{tok:>8} {pt:12.4f} {qt:12.4f} {kl:10.4f}")
