"""
Memory and time of the distillation term and of its approximations at an LLM's vocabulary, on
CPU in float32, forward + backward through the output head:

  fused          the exact term as SDPG computes it: model.fused_reverse_kl on hidden states, one
                 (chunk, V) block of logits at a time, closed-form backward
  exact, plain   the exact term written plainly: full logits h W^T (the teacher's under no_grad),
                 sdpg.full_vocab_reverse_kl, autograd
  top-k renorm   approx.topk_student_renorm, k = 100: the student's full logits are still formed
                 (its support is their top k); the KL itself is over k entries
  top-k + tail   approx.topk_student_tail, k = 100: the same plus each side's logsumexp over the
                 vocabulary and over the entries outside the support
  sampled, plain approx.sampled_token on full logits: log p(y) = z_y - logsumexp(z), so the full
                 (N, V) logits are formed and autograd keeps them for logsumexp's backward; the
                 (N, V) log-probabilities are not formed (TRL's selective_log_softmax does the
                 same, a row of the batch at a time)
  sampled, chunked  the same estimate from model.chunked_token_logprobs (student: each chunk's
                 logits recomputed in backward; teacher: no_grad), so no (N, V) block exists:
                 what the sampled token costs when written to need log p(y) only

    python tools/bench_approx.py      # 10 to 13 minutes on this shared 2-core CPU (743 s in
                                      # the committed run); writes results/approx/bench_cpu.txt

Shapes: N = 4096 response tokens, hidden size H = 256 (an LLM's is 10 to 20 times that: the
head's matmuls then weigh more, the (N, V) blocks the same), V = 50304 (GPT-2 padded) and
151936 (Qwen2.5/3). At V = 151936 one (N, V) fp32 block of N = 4096 is 2.5 GB and the plain
exact term holds about seven of them (about 17 GB of this 23 GiB machine, which other jobs
share), so there the cases that form full logits run at N = 2048, and fused runs at both N.

Memory: each case runs in a fresh subprocess; its figure is the peak resident set
(resource.getrusage(RUSAGE_SELF).ru_maxrss) after the first forward + backward minus the
resident set (VmRSS) once the inputs exist and every path has run once on a small slice, so it
counts what the pass allocates beyond the inputs: logits, saved tensors, and the gradients of h
and W (W's is V x H, 155 MB at V = 151936). The workers run with MALLOC_MMAP_THRESHOLD_ = 1 MiB:
glibc then maps every block of 1 MiB or more on its own and unmaps it when torch frees it, so
the peak counts the tensors alive at once. Under glibc's default (a threshold that rises to
32 MiB after the first large free) the chunked paths' 24 MB blocks land on the heap, which keeps
freed space, and their resident peak read 2 to 3 times higher in a trial (fused 531 MiB and
sampled-chunked 2357 MiB at V = 50304, N = 4096); the full-logit cases' blocks are mapped
either way. Time: the median over --repeats passes of forward + backward, the first included;
the fused case at full N beside a reduced N runs one pass (its point is the memory). The machine
is shared with other jobs, so times are noisy: compare the ratios within one run.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import approx  # noqa: E402
import sdpg  # noqa: E402
from model import chunk_rows, chunked_token_logprobs, fused_reverse_kl  # noqa: E402

OUT = os.path.join(ROOT, "results", "approx", "bench_cpu.txt")
CASES = ("fused", "exact, plain", "top-k renorm", "top-k + tail", "sampled, plain",
         "sampled, chunked")
FULL_LOGITS = ("exact, plain", "top-k renorm", "top-k + tail", "sampled, plain")


def rss_bytes():
    """This process's resident set now (VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def loss_of(case, hs, ht, W, tokens, k):
    """The case's per-token values (N,) from student and teacher hidden states (N, H), the head
    W (V, H) and sampled tokens (N,); the teacher side runs under no_grad, as in training."""
    if case == "fused":
        return fused_reverse_kl(hs, ht, W, 1.0)
    if case == "sampled, chunked":
        logp_y = chunked_token_logprobs(hs, W, tokens, 1.0)
        with torch.no_grad():
            logq_y = chunked_token_logprobs(ht, W, tokens, 1.0)
        return (logp_y - logq_y).detach() * logp_y
    zs = hs @ W.T  # (N, V): every remaining case forms the student's full logits
    with torch.no_grad():
        zt = ht @ W.T
    if case == "exact, plain":
        return sdpg.full_vocab_reverse_kl(zs, zt)
    if case == "top-k renorm":
        return approx.topk_student_renorm(zs, zt, k)
    if case == "top-k + tail":
        return approx.topk_student_tail(zs, zt, k)
    if case == "sampled, plain":
        return approx.sampled_token(zs, zt, tokens)
    raise ValueError(f"unknown case {case!r}")


def worker(case, N, H, V, k, repeats, device="cpu"):
    """One case in this (fresh) process: prints JSON with the peak extra memory of the first
    forward + backward and the median time over the repeats. On CUDA the memory is the peak of
    torch.cuda.max_memory_allocated over what the inputs hold, the time taken after a
    synchronize."""
    torch.manual_seed(0)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    hs = torch.randn(N, H, device=dev, requires_grad=True)
    ht = torch.randn(N, H, device=dev)
    W = torch.randn(V, H, device=dev)
    W.mul_(0.5)  # in place: no second (V, H) block to raise the resident set's high-water mark
    W.requires_grad_()
    w = torch.rand(N, device=dev)
    tokens = torch.randint(0, V, (N,), device=dev)
    # every path once on a small slice, so that autograd, the thread pools and the kernels are
    # loaded before the baseline is read
    small_tokens = tokens[:8] % 64
    for name in CASES:
        (loss_of(name, hs[:8], ht[:8], W[:64], small_tokens, 4) * w[:8]).sum().backward()
    hs.grad = None
    W.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times = []
    peak = 0
    for i in range(repeats):
        hs.grad = None
        W.grad = None
        start = time.perf_counter()
        (loss_of(case, hs, ht, W, tokens, k) * w).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        # the first pass's peak; the later passes allocate the same blocks again
        if i == 0 and cuda:
            peak = torch.cuda.max_memory_allocated() - base
        elif i == 0:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_extra": peak, "time": statistics.median(times), "times": times}))


def run_case(case, N, H, V, k, repeats, device="cpu"):
    """Runs worker in a fresh subprocess; its JSON, or {"error": ...} if it failed."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", case, "--tokens", str(N),
               "--hidden", str(H), "--k", str(k), "--repeats", str(repeats), "--one_vocab",
               str(V), "--device", device]
    # see the module's docstring: so that the resident peak counts live tensors only
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2 ** 20))
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        return {"error": f"exit {result.returncode}: {result.stderr.strip()[-300:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine():
    """The CPU model (lscpu), the number of CPUs, and the memory, as one line."""
    model = platform.processor() or "unknown CPU"
    listing = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        if line.startswith("Model name"):
            model = line.split(":", 1)[1].strip()
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) / 2 ** 20
    return f"{model}, {os.cpu_count()} CPUs, {total:.0f} GiB"


def plan(args):
    """The (V, N, case, passes) list: at each V every case at N = --tokens, except that where
    V >= --big_vocab the full-logit cases run at --big_vocab_tokens, and fused at both (one pass
    at the full N, which only its memory needs)."""
    rows = []
    for V in args.vocab:
        if V >= args.big_vocab:
            rows.append((V, args.tokens, "fused", 1))
            for case in CASES:
                rows.append((V, args.big_vocab_tokens, case, args.repeats))
        else:
            for case in CASES:
                rows.append((V, args.tokens, case, args.repeats))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="N, response tokens")
    parser.add_argument("--hidden", type=int, default=256, help="H")
    parser.add_argument("--vocab", type=int, nargs="+", default=[50304, 151936])
    parser.add_argument("--big_vocab", type=int, default=100000,
                        help="from this V on, the full-logit cases run at --big_vocab_tokens")
    parser.add_argument("--big_vocab_tokens", type=int, default=2048)
    parser.add_argument("--k", type=int, default=100, help="the top-k cases' k")
    parser.add_argument("--repeats", type=int, default=2, help="passes per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", default="", help="(internal) run one case")
    parser.add_argument("--one_vocab", type=int, default=0, help="(internal) its V")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (memory: peak allocated)")
    parser.add_argument("--out", default=OUT, help="where the table goes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.tokens, args.hidden, args.one_vocab, args.k, args.repeats,
               args.device)
        return
    where = machine()
    memory = ("peak RSS (ru_maxrss) of a fresh process after the first forward + backward, "
              "minus its RSS once the inputs exist, glibc MALLOC_MMAP_THRESHOLD_ = 1 MiB")
    if args.device.startswith("cuda"):
        where += f" | {torch.cuda.get_device_name(torch.device(args.device))}"
        memory = ("peak torch.cuda.max_memory_allocated of a fresh process in the first forward + "
                  "backward, minus what the inputs hold")
    command = "python tools/bench_approx.py" + "".join(" " + a for a in sys.argv[1:])
    lines = [f"# bench_approx: {command}",
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} | {where} | torch "
             f"{torch.__version__} | {args.device}, {args.threads} threads | float32 | "
             f"H = {args.hidden} | top-k k = {args.k} | fused chunk = model.chunk_rows(0, V) rows",
             f"memory: {memory}; time: median of {args.repeats} passes of forward + backward "
             "(first included). Shared machine: compare ratios within this run.", ""]
    for line in lines:
        print(line, flush=True)
    header = ["| V | N | case | peak extra memory | in (N, V) fp32 blocks | time fwd+bwd "
              "| memory / fused | time / fused |", "|---|---|---|---|---|---|---|---|"]
    for line in header:
        print(line, flush=True)
    lines += header
    started = time.perf_counter()
    fused = {}
    for V, N, case, passes in plan(args):
        result = run_case(case, N, args.hidden, V, args.k, passes, args.device)
        block = N * V * 4
        if "error" in result:
            line = f"| {V} | {N} | {case} | failed: {result['error']} | | | | |"
        else:
            if case == "fused":
                fused[(V, N)] = result
            ratios = "| - | -"
            if case != "fused" and (V, N) in fused:
                reference = fused[(V, N)]
                ratios = (f"| {result['peak_extra'] / reference['peak_extra']:.2f}x "
                          f"| {result['time'] / reference['time']:.2f}x")
            shown_time = f"{result['time']:.1f} s"
            if passes == 1:
                shown_time += " (1 pass)"
            line = (f"| {V} | {N} | {case} | {result['peak_extra'] / 2 ** 20:.0f} MiB "
                    f"| {result['peak_extra'] / block:.2f} | {shown_time} {ratios} |")
        print(line, flush=True)
        lines.append(line)
    notes = ["",
             f"chunk rows: {chunk_rows(0, args.vocab[0])} at V = {args.vocab[0]}"
             + "".join(f", {chunk_rows(0, V)} at V = {V}" for V in args.vocab[1:])
             + f". One (N, V) fp32 block: N V 4 bytes. Full-logit cases at V >= "
             f"{args.big_vocab} ran at N = {args.big_vocab_tokens} (memory). Whole run "
             f"{time.perf_counter() - started:.0f} s."]
    for line in notes:
        print(line)
    lines += notes
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
