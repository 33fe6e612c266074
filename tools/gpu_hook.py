"""
The PPO ratio of the first mini-batch of an RL step, before its update, in the run's precision.

    python tools/gpu_hook.py <sdpg.py flags>   # e.g. --rl_steps 2 --eval_every 0 --eval_samples 0
    python tools/gpu_hook.py --selftest        # ratio_hook on a small random model; needs no sdpg.main

At that point the weights being trained are the ones that sampled the rollouts (pi_theta = pi_old),
so r_t = exp(log pi_theta(y_t) - log pi_old(y_t)) is 1 up to the numerics of two passes: pi_old from
the no-grad scoring pass (GPT.shared_prefix_hidden, a KV cache, each prompt once) and pi_theta from the training
forward (response_hidden over the whole sequence), both under the run's autocast. In fp32 the ratio
is 1 to about 1e-6; in bf16 its spread shows how many tokens the clip catches before the policy has
moved at all. The fields go into that step's "rl" record of log.jsonl and are printed on one line:

    ratio_mean     mean of r_t over the response tokens (mask)
    ratio_maxdev   max |r_t - 1| over them
    clip_frac0     fraction of them with r_t outside [1 - clip_low, 1 + clip_high]

Uses the extension point sdpg.main(argv=None, task=None, hook=None): hook(run, step, beta_k, mb) runs
on each RL step's first mini-batch before its update and returns extra fields for the step's record.
"""
import json
import os
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)
from model import chunked_token_logprobs, response_hidden  # noqa: E402

HOOK_STEP = 1  # the step whose first mini-batch is measured


def _field(mb, name, *aliases):
    """mb.name (the hook's interface), or mb[name] / mb[alias] for a dict mini-batch."""
    for key in (name, *aliases):
        if hasattr(mb, key):
            return getattr(mb, key)
        if isinstance(mb, dict) and key in mb:
            return mb[key]
    raise AttributeError(f"mini-batch has no field {name!r}")


@torch.no_grad()
def first_ratio_stats(run, mb):
    """The ratio fields of one mini-batch: the student's log-probs of mb.resp from the training
    forward (gradients off, inside run.ctx) against mb.old_logp, over the tokens of mb.mask.
    Summed over ranks when a process group is up (every rank must call it)."""
    x, resp = _field(mb, "x", "student"), _field(mb, "resp")
    mask, old_logp = _field(mb, "mask").bool(), _field(mb, "old_logp")
    args = run.args
    with run.ctx:
        h = response_hidden(run.model, x, resp).flatten(0, 1)  # (B*Tr, H)
        logp = chunked_token_logprobs(h, run.model.lm_head_weight, resp.flatten(), args.temperature).view(resp.shape)
    ratio = torch.exp(logp.float() - old_logp.float())[mask]  # masked first: padding could overflow
    outside = (ratio < 1 - args.clip_low) | (ratio > 1 + args.clip_high)
    sums = torch.stack([ratio.double().sum(), outside.double().sum(), torch.tensor(float(ratio.numel()), device=ratio.device,
                                                                                   dtype=torch.float64)])
    maxdev = (ratio - 1).abs().max().double() if ratio.numel() else torch.zeros((), dtype=torch.float64, device=ratio.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(maxdev, op=dist.ReduceOp.MAX)
    total, n_outside, n = sums.tolist()
    n = max(n, 1.0)
    return {"ratio_mean": total / n, "ratio_maxdev": maxdev.item(), "clip_frac0": n_outside / n, "ratio_tokens": int(n)}


def ratio_hook(run, step, beta_k, mb):
    """sdpg.main's hook: the ratio fields at step HOOK_STEP only, nothing at the others."""
    if step != HOOK_STEP:
        return {}
    out = first_ratio_stats(run, mb)
    if os.environ.get("RANK", "0") == "0":
        print("gpu_hook: " + json.dumps({"step": step, "dtype": getattr(run.args, "dtype", None), **out}), flush=True)
    return out


def selftest():
    """ratio_hook on a random GPT, old_logp from the scoring pass as sdpg.py takes it: r = 1 in fp32,
    padding ignored, other steps give nothing; the bf16 figures are printed. Exit 1 on a failure."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    P, G, Tp, L = 8, 4, 6, 8
    model = GPT(GPTConfig(block_size=Tp + L, vocab_size=258, n_layer=2, n_head=2, n_embd=64)).to(device)
    prompts = torch.randint(0, 256, (P, Tp), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    failures = []
    for dtype in ("float32", "bfloat16"):
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
        with torch.no_grad(), ctx:
            resp, mask = model.generate(prompts, L, 257, G, 1.0, gen)
            h = model.shared_prefix_hidden(prompts, resp, G)
            old_logp = chunked_token_logprobs(h.flatten(0, 1), model.lm_head_weight, resp.flatten()).view(resp.shape)
        mask[::3, L // 2:] = 0  # some padding, whose old log-probs are garbage
        old_logp = torch.where(mask.bool(), old_logp, torch.full_like(old_logp, -1e4))
        run = SimpleNamespace(args=SimpleNamespace(temperature=1.0, clip_low=0.2, clip_high=0.2, dtype=dtype),
                              model=model, ref_model=model, device=device, ctx=ctx, world_size=1)
        mb = SimpleNamespace(x=prompts.repeat_interleave(G, 0), resp=resp, mask=mask, old_logp=old_logp, ref_logp=old_logp)
        out = ratio_hook(run, HOOK_STEP, 0.0, mb)
        as_dict = first_ratio_stats(run, {"student": mb.x, "resp": resp, "mask": mask, "old_logp": old_logp})
        if ratio_hook(run, HOOK_STEP + 1, 0.0, mb) != {}:
            failures.append("a step other than HOOK_STEP returned fields")
        if as_dict != out:
            failures.append(f"{dtype}: a dict mini-batch gave {as_dict}, the attribute one {out}")
        if out["ratio_tokens"] != int(mask.sum().item()):
            failures.append(f"{dtype}: {out['ratio_tokens']} tokens counted, mask has {int(mask.sum().item())}")
        if dtype == "float32" and not (abs(out["ratio_mean"] - 1) < 1e-4 and out["ratio_maxdev"] < 1e-3
                                       and out["clip_frac0"] == 0):
            failures.append(f"float32: ratio should be 1, got {out}")
    for f in failures:
        print(f"gpu_hook selftest: FAILED: {f}")
    print(f"gpu_hook selftest ({device}): " + ("ok" if not failures else f"{len(failures)} failure(s)"))
    return 1 if failures else 0


def main(argv):
    if argv[:1] == ["--selftest"]:
        return selftest()
    import sdpg  # after sys.path is set; sdpg.py runs nothing on import
    if not callable(getattr(sdpg, "main", None)):
        sys.exit("gpu_hook.py: sdpg.main(argv, task, hook) not found: this sdpg.py predates the hook extension point")
    sdpg.main(argv, hook=ratio_hook)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
