"""
Benchmark: prints, in one run, the costs that decide SDPG's speed and memory.

  1. exact KL: naive (full (N, V) logits, autograd) vs fused_reverse_kl (chunked lm_head with the
     closed-form backward) at V = 50304, N = 4096: peak extra memory, forward+backward time, error
  2. rollouts: tokens/s of GPT.generate (KV cache, shared prefill) vs recomputing the whole prefix
  3. one RL step of sdpg.py split into phases, --algo sdpg vs --algo grpo, and their ratio

    python tools/bench.py                 # all three, about 3 minutes on a 2-core CPU
    python tools/bench.py --only kl       # or rollout, or step

Memory on CPU is the peak resident set of a fresh process minus its size once the inputs exist
(each measurement runs in its own subprocess); on CUDA it is torch.cuda.max_memory_allocated.
Times are medians over repeats; machines are noisy, so compare the ratios within one run.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)
import sdpg  # noqa: E402
from model import GPT, GPTConfig, chunk_rows  # noqa: E402


def rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_kl(hs, ht, W):
    """The readable path: materialise both (N, V) logits, autograd through full_vocab_reverse_kl."""
    return sdpg.full_vocab_reverse_kl(hs @ W.T, ht @ W.T)


def kl_worker(impl, N, H, V, chunk, repeats, device):
    """One process, one implementation: peak extra memory of the first forward+backward, then timings."""
    torch.manual_seed(0)
    hs = torch.randn(N, H, device=device, requires_grad=True)
    ht = torch.randn(N, H, device=device)
    W = (0.5 * torch.randn(V, H, device=device)).requires_grad_()
    w = torch.rand(N, device=device)
    fn = (lambda: naive_kl(hs, ht, W)) if impl == "naive" else (lambda: sdpg.fused_reverse_kl(hs, ht, W, 1.0, chunk))
    small = torch.randn(8, H, device=device, requires_grad=True)  # start autograd and the thread pools first
    sdpg.fused_reverse_kl(small, small, W[:16], 1.0, 4).sum().backward()
    naive_kl(small, small, W[:16]).sum().backward()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times = []
    for i in range(repeats + 1):
        hs.grad = W.grad = None
        sync(device)
        t = time.perf_counter()
        (fn() * w).sum().backward()
        sync(device)
        times.append(time.perf_counter() - t)
        if i == 0:  # peak of the first pass, before anything is cached between passes
            peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    print(json.dumps({"peak_extra": peak, "time": statistics.median(times[1:])}))


def kl_error(N, H, V, chunk, device):
    """Max abs difference over values and both gradients: fused vs naive at fp32 on the whole
    problem, and fused fp32 vs naive float64 on the first 256 rows."""
    torch.manual_seed(0)
    hs0, ht0, W0 = torch.randn(N, H, device=device), torch.randn(N, H, device=device), 0.5 * torch.randn(V, H, device=device)

    def run(f, dtype, n):
        hs, W = hs0[:n].to(dtype, copy=True).requires_grad_(), W0.to(dtype, copy=True).requires_grad_()
        kl = f(hs, ht0[:n].to(dtype), W)
        (kl * torch.linspace(0, 1, n, device=device, dtype=dtype)).sum().backward()
        return kl.detach().double(), hs.grad.double(), W.grad.double()

    def fused(hs, ht, W):
        return sdpg.fused_reverse_kl(hs, ht, W, 1.0, chunk)

    def err(x, y):  # max abs error over values and both gradients, each relative to its largest entry
        return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(x, y))

    n = min(N, 256)
    return {"fused vs naive, fp32": err(run(fused, torch.float32, N), run(naive_kl, torch.float32, N)),
            f"fused fp32 vs float64 ({n} rows)": err(run(fused, torch.float32, n), run(naive_kl, torch.float64, n))}


def bench_kl(args, device):
    N, H, V = args.tokens, args.hidden, args.vocab
    args.chunk = chunk_rows(args.chunk, V)
    print(f"\n## 1. exact reverse KL, N = {N} tokens, H = {H}, V = {V}, forward + backward ({device})\n")
    rows = {}
    for impl in ("naive", "fused"):
        cmd = [sys.executable, __file__, "--kl_worker", impl, "--tokens", str(N), "--hidden", str(H), "--vocab", str(V),
               "--chunk", str(args.chunk), "--repeats", str(args.repeats), "--device", str(device)]
        rows[impl] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    err = kl_error(N, H, V, args.chunk, device)
    print("| path | peak extra memory | time fwd+bwd (median) |")
    print("|---|---|---|")
    for impl, label in (("naive", "naive: (N, V) logits + autograd"), ("fused", f"fused_reverse_kl, chunk {args.chunk}")):
        print(f"| {label} | {rows[impl]['peak_extra'] / 2**20:.0f} MiB | {rows[impl]['time']:.2f} s |")
    print(f"\nfused / naive: memory {rows['fused']['peak_extra'] / rows['naive']['peak_extra']:.3f}x, "
          f"time {rows['fused']['time'] / rows['naive']['time']:.2f}x")
    print("max abs error of values and gradients, relative to each one's largest entry: "
          + ", ".join(f"{k} {v:.1e}" for k, v in err.items()))


@torch.no_grad()
def generate_recompute(model, prompts, max_new_tokens, eot, num_samples, temperature, generator):
    """The baseline: no cache, every prompt repeated G times, a full forward over the whole prefix per token."""
    seq = prompts.repeat_interleave(num_samples, 0)
    done = torch.zeros(seq.size(0), dtype=torch.bool, device=seq.device)
    mask = []
    for _ in range(max_new_tokens):
        probs = F.softmax(model(seq)[:, -1].float() / temperature, -1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
        mask.append(~done)
        done = done | (nxt == eot)
        seq = torch.cat([seq, nxt[:, None]], 1)
        if done.all():
            break
    return seq[:, prompts.size(1):], torch.stack(mask, 1).float()


def bench_rollout(args, device):
    d = sdpg.parser.parse_args([])  # the default rollout shape of sdpg.py
    P, G, L = d.prompts_per_step, d.group_size, d.max_new_tokens
    print(f"\n## 2. rollouts: {P} prompts x {G} samples, up to {L} new tokens, default model ({device})\n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=258, n_layer=d.n_layer, n_head=d.n_head, n_embd=d.n_embd)).to(device)
    prompts = torch.randint(0, 256, (P, 6), device=device)
    eot = 257  # never sampled by this untrained model in practice, so both run all L steps
    res = {}
    for name, fn in (("KV cache, shared prefill", model.generate), ("recompute whole prefix", lambda *a: generate_recompute(model, *a))):
        times, toks = [], 0
        for i in range(args.repeats + 2):
            g = torch.Generator(device=device).manual_seed(i)
            sync(device)
            t = time.perf_counter()
            _, mask = fn(prompts, L, eot, G, 1.0, g)
            sync(device)
            times.append(time.perf_counter() - t)
            toks = mask.sum().item()
        res[name] = toks / statistics.median(times[2:])
    print("| rollout | tokens/s (median) |")
    print("|---|---|")
    for name, v in res.items():
        print(f"| {name} | {v:.0f} |")
    a, b = res.values()
    print(f"\ncache / recompute: {a / b:.2f}x")


def bench_step(args, device):
    steps = args.steps
    print(f"\n## 3. one RL step of sdpg.py by phase, default config, median over steps 6..{steps} of "
          f"{args.rounds} alternating runs per algo ({device})\n")
    tmp = tempfile.mkdtemp()
    phases = ("dt_rollout", "dt_logp", "dt_teacher", "dt_update", "dt")
    records = {"sdpg": [], "grpo": []}
    try:
        for i in range(args.rounds):
            for algo in ("sdpg", "grpo"):  # alternate, so drift on a shared machine hits both alike
                out = os.path.join(tmp, f"{algo}{i}")
                os.makedirs(out)
                if os.path.exists(os.path.join(tmp, "sft.pt")):  # the same warm start for every run
                    shutil.copy(os.path.join(tmp, "sft.pt"), out)
                cmd = [sys.executable, os.path.join(ROOT, "sdpg.py"), "--algo", algo, "--rl_steps", str(steps),
                       "--eval_every", "0", "--eval_size", "100", "--out_dir", out, "--device", str(device)]
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                shutil.copy(os.path.join(out, "sft.pt"), tmp)
                with open(os.path.join(out, "log.jsonl")) as f:
                    records[algo] += [r for r in map(json.loads, f) if r["phase"] == "rl"][5:]
    finally:
        shutil.rmtree(tmp)
    med = {algo: {k: statistics.median(r[k] for r in rs) for k in phases} for algo, rs in records.items()}
    print("| phase (ms) | rollout | pi_old + pi_ref log-probs | teacher | update | whole step |")
    print("|---|---|---|---|---|---|")
    for algo in ("sdpg", "grpo"):
        print(f"| {algo} | " + " | ".join(f"{1000 * med[algo][k]:.0f}" for k in phases) + " |")
    print(f"\nsdpg / grpo step time: {med['sdpg']['dt'] / med['grpo']['dt']:.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["kl", "rollout", "step"], help="run one part")
    p.add_argument("--device", default="auto")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--chunk", type=int, default=0, help="rows per chunk (0: chunk_rows)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="RL steps per run in part 3")
    p.add_argument("--rounds", type=int, default=3, help="runs per algo in part 3, alternating")
    p.add_argument("--kl_worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.kl_worker:
        kl_worker(args.kl_worker, args.tokens, args.hidden, args.vocab, args.chunk, args.repeats, device)
        sys.exit(0)
    print(f"# SDPG benchmark | torch {torch.__version__} | {device} | {os.cpu_count()} CPU threads"
          + (f" | {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    for part, fn in (("kl", bench_kl), ("rollout", bench_rollout), ("step", bench_step)):
        if args.only in (None, part):
            fn(args, device)
