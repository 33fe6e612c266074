"""
Benchmark: prints, in one run, the costs that decide SDPG's speed and memory.

  1. exact KL: naive (full (N, V) logits, autograd) vs fused_reverse_kl (chunked lm_head with the
     closed-form backward) at V = 50304, N = 4096: peak extra memory, forward+backward time, error
  2. rollouts: tokens/s of GPT.generate (KV cache, shared prefill) vs recomputing the whole prefix
  3. one RL step of sdpg.py split into phases, --algo sdpg vs --algo grpo, and their ratio
  4. (CUDA only) exact KL as N grows: naive vs fused at V = 50304, H = 128 and 512, N = 4096, 8192, ...
     doubling until the naive path runs out of GPU memory (then the fused path at that N too):
     peak extra memory, forward+backward time, fused/naive ratios, and where each one OOMs

    python tools/bench.py                 # all of them (4 on CUDA only), about 3 minutes on a 2-core CPU
    python tools/bench.py --only kl       # or gpu_kl, rollout, step; --only may be given more than once

Memory on CPU is the peak resident set of a fresh process minus its size once the inputs exist
(each measurement runs in its own subprocess); on CUDA it is torch.cuda.max_memory_allocated minus
the memory allocated once the inputs exist. Times are medians over repeats (part 4: 5 after 2
warm-ups); machines are noisy, so compare the ratios within one run. Part 4 prints figures only:
what to read off it is the memory and time ratios at N >= 16k and whether naive OOMs before fused.
"""
import argparse
import gc
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
import sdpg  # noqa: E402  (full_vocab_reverse_kl, the readable KL, and parser, the default rollout shape)
from model import GPT, GPTConfig, chunk_rows, fused_reverse_kl  # noqa: E402


def rss_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_kl(hs, ht, W):
    """The readable path: materialise both (N, V) logits, autograd through full_vocab_reverse_kl."""
    return sdpg.full_vocab_reverse_kl(hs @ W.T, ht @ W.T)


def kl_inputs(impl, N, H, V, chunk, device):
    """Seeded student and teacher hidden states (N, H), a head W (V, H), token weights (N,), and the
    chosen path's KL as a function of them."""
    torch.manual_seed(0)
    hs = torch.randn(N, H, device=device, requires_grad=True)
    ht = torch.randn(N, H, device=device)
    W = (0.5 * torch.randn(V, H, device=device)).requires_grad_()
    w = torch.rand(N, device=device)
    fn = (lambda: naive_kl(hs, ht, W)) if impl == "naive" else (lambda: fused_reverse_kl(hs, ht, W, 1.0, chunk))
    return hs, ht, W, w, fn


def kl_worker(impl, N, H, V, chunk, repeats, device):
    """One process, one implementation: peak extra memory of the first forward+backward, then timings."""
    hs, ht, W, w, fn = kl_inputs(impl, N, H, V, chunk, device)
    small = torch.randn(8, H, device=device, requires_grad=True)  # start autograd and the thread pools first
    fused_reverse_kl(small, small, W[:16], 1.0, 4).sum().backward()
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
        return fused_reverse_kl(hs, ht, W, 1.0, chunk)

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


def gpu_kl_point(impl, N, H, V, chunk, repeats, warmup, device):
    """One path at one N on CUDA, in this process: (peak memory beyond the inputs, median time of
    forward + backward over repeats after warmup passes). Raises torch.cuda.OutOfMemoryError."""
    hs, ht, W, w, fn = kl_inputs(impl, N, H, V, chunk, device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()  # the inputs' own memory
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(warmup + repeats):
        hs.grad = W.grad = None  # each pass allocates its gradients afresh: they count in the peak
        torch.cuda.synchronize()
        t = time.perf_counter()
        (fn() * w).sum().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return torch.cuda.max_memory_allocated() - base, statistics.median(times[warmup:])


def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e) or "CUBLAS_STATUS_ALLOC_FAILED" in str(e)


def gpu_kl_measure(*a):
    """gpu_kl_point, or None where it runs out of memory; the cache is emptied either way."""
    try:
        out = gpu_kl_point(*a)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        out = None
    gc.collect()  # the failed pass's tensors are freed with its frames, outside the except block
    torch.cuda.empty_cache()
    return out


def bench_gpu_kl(args, device):
    V, chunk = args.vocab, chunk_rows(args.chunk, args.vocab)
    print(f"\n## 4. exact reverse KL on the GPU as N grows, V = {V}, forward + backward, fp32 inputs ({device})\n",
          flush=True)
    if device.type != "cuda":
        print("skipped: no CUDA")
        return
    total = torch.cuda.get_device_properties(device).total_memory
    print(f"{torch.cuda.get_device_name(device)}, {total / 2**30:.0f} GiB | fused chunk {chunk} rows | "
          f"fp32 matmul precision {torch.get_float32_matmul_precision()} | median of {args.gpu_repeats} after 2 warm-ups | "
          "memory: peak beyond the inputs (gradients included)\n", flush=True)
    t_start = time.perf_counter()
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    for H in args.gpu_hidden:
        err = kl_error(args.gpu_start, H, V, chunk, device)
        print(f"### H = {H}\n\nmax abs error at N = {args.gpu_start}, relative to each one's largest entry: "
              + ", ".join(f"{k} {v:.1e}" for k, v in err.items()) + "\n")
        print("| N | naive memory | naive time | fused memory | fused time | memory fused/naive | time fused/naive |")
        print("|---|---|---|---|---|---|---|", flush=True)
        N, ratios, naive_oom, fused_oom = args.gpu_start, [], None, None
        while N <= args.gpu_max_tokens:
            naive = gpu_kl_measure("naive", N, H, V, chunk, args.gpu_repeats, 2, device)
            fused = gpu_kl_measure("fused", N, H, V, chunk, args.gpu_repeats, 2, device)
            cells = [mib(naive[0]) if naive else "OOM", f"{naive[1] * 1000:.1f} ms" if naive else "-",
                     mib(fused[0]) if fused else "OOM", f"{fused[1] * 1000:.1f} ms" if fused else "-"]
            if naive and fused:
                ratios.append((N, fused[0] / naive[0], fused[1] / naive[1]))
                cells += [f"{ratios[-1][1]:.3f}x", f"{ratios[-1][2]:.2f}x"]
            else:
                cells += ["-", "-"]
            print(f"| {N} | " + " | ".join(cells) + " |", flush=True)
            naive_oom = naive_oom or (None if naive else N)
            fused_oom = fused_oom or (None if fused else N)
            if naive is None or fused is None:  # the fused path has been run up to the naive one's OOM
                break
            if time.perf_counter() - t_start > args.gpu_budget_s:
                print(f"\nstopped after N = {N}: the time budget of {args.gpu_budget_s:.0f} s is spent")
                break
            N *= 2
        big = [r for r in ratios if r[0] >= 16384]
        if big:
            print(f"\nN >= 16384 (H = {H}): memory fused/naive {min(r[1] for r in big):.3f}x to {max(r[1] for r in big):.3f}x, "
                  f"time fused/naive {min(r[2] for r in big):.2f}x to {max(r[2] for r in big):.2f}x")
        where = lambda n: f"OOM at N = {n}" if n else "no OOM"  # noqa: E731
        verdict = ("naive OOMs before fused" if naive_oom and not fused_oom else
                   "both OOM at the same N" if naive_oom and naive_oom == fused_oom else
                   "fused OOMs before naive" if fused_oom and not naive_oom else "neither OOMed in the range run")
        print(f"naive: {where(naive_oom)}; fused: {where(fused_oom)}: {verdict}\n", flush=True)


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


def step_worker(algo, out, steps, device):
    """One sdpg.py run in this process with its phase functions wrapped in timers (synchronised on
    CUDA); the per-step phase times of steps 6.. go to out/phases.json."""
    times, step = [], {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            sync(device)
            t = time.perf_counter()
            result = fn(*a, **kw)
            sync(device)
            step[name] = step.get(name, 0.0) + time.perf_counter() - t
            if name == "update":  # the last phase of a step
                times.append(dict(step, dt=sum(step.values())))
                step.clear()
            return result
        return wrapper
    for name in ("sample_rollouts", "score_rollouts", "update"):
        setattr(sdpg, name, timed(name, getattr(sdpg, name)))
    sdpg.main(["--algo", algo, "--rl_steps", str(steps), "--eval_every", "0", "--eval_size", "100",
               "--eval_samples", "0", "--out_dir", out, "--device", str(device)])
    with open(os.path.join(out, "phases.json"), "w") as f:
        json.dump(times[5:], f)


def bench_step(args, device):
    steps = args.steps
    print(f"\n## 3. one RL step of sdpg.py by phase, default config, median over steps 6..{steps} of "
          f"{args.rounds} alternating runs per algo ({device})\n")
    tmp = tempfile.mkdtemp()
    phases = ("sample_rollouts", "score_rollouts", "update", "dt")
    records = {"sdpg": [], "grpo": []}
    try:
        for i in range(args.rounds):
            for algo in ("sdpg", "grpo"):  # alternate, so drift on a shared machine hits both alike
                out = os.path.join(tmp, f"{algo}{i}")
                os.makedirs(out)
                if os.path.exists(os.path.join(tmp, "sft.pt")):  # the same warm start for every run
                    shutil.copy(os.path.join(tmp, "sft.pt"), out)
                cmd = [sys.executable, os.path.abspath(__file__), "--step_worker", algo, out, str(steps), str(device)]
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                shutil.copy(os.path.join(out, "sft.pt"), tmp)
                with open(os.path.join(out, "phases.json")) as f:
                    records[algo] += json.load(f)
    finally:
        shutil.rmtree(tmp)
    med = {algo: {k: statistics.median(r[k] for r in rs) for k in phases} for algo, rs in records.items()}
    print("| phase (ms) | rollouts (sample, verify) | pi_old + pi_ref log-probs, advantages | "
          "updates (teacher, loss, step) | whole step |")
    print("|---|---|---|---|---|")
    for algo in ("sdpg", "grpo"):
        print(f"| {algo} | " + " | ".join(f"{1000 * med[algo][k]:.0f}" for k in phases) + " |")
    print(f"\nsdpg / grpo step time: {med['sdpg']['dt'] / med['grpo']['dt']:.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=["kl", "gpu_kl", "rollout", "step"],
                   help="run this part only (may be repeated)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--chunk", type=int, default=0, help="rows per chunk (0: chunk_rows)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="RL steps per run in part 3")
    p.add_argument("--rounds", type=int, default=3, help="runs per algo in part 3, alternating")
    p.add_argument("--gpu_hidden", type=lambda v: [int(h) for h in v.split(",")], default=[128, 512],
                   help="part 4: hidden sizes, comma-separated")
    p.add_argument("--gpu_start", type=int, default=4096, help="part 4: first N, doubled until naive OOMs")
    p.add_argument("--gpu_max_tokens", type=int, default=2**21, help="part 4: largest N tried")
    p.add_argument("--gpu_repeats", type=int, default=5, help="part 4: timed passes per point, after 2 warm-ups")
    p.add_argument("--gpu_budget_s", type=float, default=240, help="part 4: no new N after this many seconds")
    p.add_argument("--kl_worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    p.add_argument("--step_worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.step_worker:
        algo, out, steps, dev = args.step_worker
        step_worker(algo, out, int(steps), torch.device(dev))
        sys.exit(0)
    if args.kl_worker:
        kl_worker(args.kl_worker, args.tokens, args.hidden, args.vocab, args.chunk, args.repeats, device)
        sys.exit(0)
    print(f"# SDPG benchmark | torch {torch.__version__} | {device} | {os.cpu_count()} CPU threads"
          + (f" | {torch.cuda.get_device_name()}" if device.type == "cuda" else ""))
    parts = (("kl", bench_kl), ("rollout", bench_rollout), ("step", bench_step), ("gpu_kl", bench_gpu_kl))
    for part, fn in parts:
        if part in (args.only or [p for p, _ in parts if p != "gpu_kl" or device.type == "cuda"]):
            fn(args, device)
