"""
The parts of sdpg.py a reader learning SDPG can skip: flag checks, the DDP setup, logging,
Ctrl-C handling, checkpoints, the supervised warm start, DAPO dynamic sampling, evaluation and
the loss diagnostics. Nothing here changes what the SDPG loss computes.
"""
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import decode_response, encode_batch
from model import chunked_token_logprobs, fused_reverse_kl, response_hidden


def print0(*a):
    """print on rank 0 only (RANK is set by torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(*a, flush=True)


def die(msg):
    """One clear line on stderr (from rank 0 only under torchrun) and a non-zero exit, no traceback."""
    if os.environ.get("RANK", "0") == "0":
        print(f"sdpg.py: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def validate(args):
    """Every flag check that needs no task and no device; one line and exit 2 on the first failure."""
    checks = [
        (args.group_size >= 2, f"--group_size must be >= 2 (got {args.group_size}): advantages compare within a group"),
        (args.sft_steps >= 0 and args.rl_steps >= 0, "--sft_steps and --rl_steps must be >= 0"),
        (min(args.beta, args.alpha, args.weight_decay, args.grad_clip) >= 0, "--beta, --alpha, --weight_decay, --grad_clip must be >= 0"),
        (args.lr > 0 and args.sft_lr > 0, "--lr and --sft_lr must be > 0"),
        (args.beta_warmup >= 0 and args.beta_decay >= 0, "--beta_warmup and --beta_decay must be >= 0"),
        (args.kl_cap >= 0 and args.kl_in_reward >= 0, "--kl_cap and --kl_in_reward must be >= 0"),
        (args.temperature > 0, "--temperature must be > 0 (rollouts are sampled)"),
        (0 <= args.clip_low < 1 and args.clip_high >= 0, "--clip_low must be in [0, 1) and --clip_high >= 0"),
        (args.dual_clip > 1, "--dual_clip must be > 1"),
        (0 <= args.sft_hint_frac <= 1 and 0 <= args.sft_teacher_until <= 1,
         "--sft_hint_frac and --sft_teacher_until must be in [0, 1]"),
        (args.eval_every >= 0, "--eval_every must be >= 0"),
        (args.sft_batch >= 1 and args.prompts_per_step >= 1 and args.num_minibatches >= 1, "batch sizes must be >= 1"),
        (args.kl_chunk >= 0, "--kl_chunk must be >= 0"),
        (args.max_bad_steps >= 1, "--max_bad_steps must be >= 1"),
        (0 <= args.rlsd_lambda <= 1 and args.rlsd_decay >= 0 and 0 <= args.rlsd_clip < 1,
         "--rlsd_lambda must be in [0, 1], --rlsd_decay >= 0 and --rlsd_clip in [0, 1)"),
        (args.max_gen_batches >= 1, "--max_gen_batches must be >= 1"),
        (args.diag_every >= 0 and args.eval_samples >= 0, "--diag_every and --eval_samples must be >= 0"),
        (min(args.n_layer, args.n_head, args.n_embd) >= 1 and args.n_embd % args.n_head == 0, "--n_embd must be a positive multiple of --n_head"),
        (not args.resume or os.path.isfile(args.resume), f"--resume {args.resume}: no such file"),
    ]
    for ok, msg in checks:
        if not ok:
            die(msg)
    if args.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:[0-9]+)?", args.device):
        die(f"--device {args.device}: use auto, cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {args.device}: CUDA is not available on this machine")


# -----------------------------------------------------------------------------
# processes, logging, interrupts

def setup_distributed(args):
    """One process per device under torchrun (nccl on CUDA, gloo on CPU), else a single process.
    Under torchrun each process takes cuda:LOCAL_RANK. Returns (rank, local_rank, world_size, device, use_cuda)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    use_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = torch.device("cpu")
    if use_cuda:
        n_gpus = torch.cuda.device_count()
        if ddp and args.device not in ("auto", "cuda"):
            die(f"--device {args.device} cannot be used under torchrun: each process takes cuda:LOCAL_RANK "
                f"(use --device cuda, and CUDA_VISIBLE_DEVICES to choose the GPUs)")
        # every process of a node checks the node's process count, so that all of them stop
        if ddp and max(int(os.environ.get("LOCAL_WORLD_SIZE", 0)), local_rank + 1) > n_gpus:
            die(f"torchrun started more processes on this node than it has GPUs ({n_gpus}): "
                f"use --nproc_per_node <= {n_gpus}, or --device cpu")
        device = torch.device(args.device if args.device.startswith("cuda:") else f"cuda:{local_rank}")
        if device.index >= n_gpus:
            die(f"--device {args.device}: this machine has {n_gpus} GPU(s), cuda:0 to cuda:{n_gpus - 1}")
        torch.cuda.set_device(device)  # before the process group, so that nccl binds this GPU
    if ddp and use_cuda:
        dist.init_process_group(backend="nccl", device_id=device)  # binds the group to this GPU
    elif ddp:
        dist.init_process_group(backend="gloo")
    return rank, local_rank, world_size, device, use_cuda


def all_sum(t):
    """Sum a tensor over ranks in place (identity without DDP). Every rank must call it."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


class JsonlLog:
    """log(record): one JSON line per record, written by rank 0; a fresh run starts a fresh file,
    a resumed one appends."""

    def __init__(self, path, append, master):
        self.file = open(path, "a" if append else "w") if master else None

    def __call__(self, record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM sets .requested: the run finishes its step, saves and exits.
    Another one more than 2 s later stops at once (torchrun forwards the first one again right
    away; it also kills its workers 30 s after its own signal, which bounds the time to finish)."""

    def __init__(self):
        import signal
        self.requested, self.when = False, 0.0
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.requested and time.time() - self.when > 2:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self.when = True, time.time()

    def any_rank(self, device):
        """True on every rank once any rank was asked to stop; every rank must call it. Under DDP
        this is an all-reduce and a host sync; a single process just reads the flag."""
        if not dist.is_initialized():
            return self.requested
        return all_sum(torch.tensor(float(self.requested), device=device)).item() > 0


# -----------------------------------------------------------------------------
# checkpoints

def rng_state(np_rng, gen):
    """This rank's random streams; a torch.Generator's state is specific to its device type."""
    return {"numpy": np_rng.bit_generator.state, "torch_gen": gen.get_state(), "torch": torch.get_rng_state(),
            "device": gen.device.type}


def rng_device(state):
    """The device type a saved rng_state came from; checkpoints written before the "device" key are
    told apart by the generator state's size (a CPU generator's is as long as torch.get_rng_state())."""
    if "device" in state:
        return state["device"]
    return "cpu" if state["torch_gen"].numel() == torch.get_rng_state().numel() else "cuda"


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename over path: a kill mid-save leaves the previous
    file intact. On failure (disk full, no permission) the temporary file is removed and OSError raised."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, device, required):
    """torch.load with weights_only=True, so no pickled code ever runs. ValueError with one line
    when the file is unreadable, truncated, not ours, or lacks one of the required keys."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # whatever the file is, the user gets one line, never a traceback
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"{path}: not a readable SDPG checkpoint ({type(e).__name__}: {first})") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not an SDPG checkpoint (no {', '.join(missing)})")
    return ckpt


def resume(path, device, model, ref_model, optimizer, model_args, rl_rng, gen, rank, world_size):
    """Load ckpt.pt into the model, the reference and the optimizer; restore this rank's random
    streams when the world size and the device type are unchanged. Returns the step to continue from.
    The file is read onto the CPU: load_state_dict copies the weights and Adam's moments to the
    parameters' device, and leaves Adam's step counters on the CPU, where torch keeps them."""
    try:
        ckpt = load_checkpoint(path, "cpu", ("model", "ref_model", "optimizer", "model_args", "step", "rng"))
    except ValueError as e:
        die(f"--resume {e}")
    if ckpt["model_args"] != model_args:
        die(f"--resume {path}: its model {ckpt['model_args']} differs from this run's {model_args}; "
            f"use the flags it was trained with")
    try:
        model.load_state_dict(ckpt["model"])
        ref_model.load_state_dict(ckpt["ref_model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        die(f"--resume {path}: weights do not fit the model ({type(e).__name__})")
    saved_on = sorted({rng_device(s) for s in ckpt["rng"]})
    # one stream per rank; a new world size or device type starts fresh streams
    if len(ckpt["rng"]) != world_size:
        print0(f"resume: saved with {len(ckpt['rng'])} ranks, running {world_size}: new random streams")
    elif saved_on != [device.type]:
        print0(f"resume: saved on {'+'.join(saved_on)}, running on {device.type}: new random streams")
    else:
        state = ckpt["rng"][rank]
        rl_rng.bit_generator.state = state["numpy"]
        gen.set_state(state["torch_gen"])
        torch.set_rng_state(state["torch"])
    print0(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"]


def save_checkpoint(path, model, ref_model, optimizer, model_args, step, config, rl_rng, gen, master):
    """ckpt.pt with each rank's random streams (gathered: every rank must call it)."""
    rngs = [rng_state(rl_rng, gen)]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state(rl_rng, gen))
    if master:
        try:
            save_atomic({"model": model.state_dict(), "ref_model": ref_model.state_dict(),
                         "optimizer": optimizer.state_dict(), "model_args": model_args, "step": step,
                         "config": config, "rng": rngs}, path)
        except OSError as e:
            die(f"saving {path}: {e.strerror or e}; the previous checkpoint is intact")


# -----------------------------------------------------------------------------
# stage 1: the supervised warm start of both views, cached in sft.pt

def sft_batch(enc, task, rng, n, hint_frac, device):
    """Warm-start batch: n problems, a fraction shown with c. Inputs (n, L) and targets (n, L),
    targets -1 except on the response; plain rows are padded on the right to the hinted length
    (causal attention keeps padding from reaching earlier positions)."""
    student, teacher, targets = encode_batch(enc, task, task.sample(rng, n), rng)
    hinted = rng.random(n) < hint_frac
    L = len(teacher[0]) + len(targets[0]) - 1
    inputs, labels = [], []
    for i in range(n):
        prompt = teacher[i] if hinted[i] else student[i]
        seq = prompt + targets[i][:-1]
        lab = [-1] * (len(prompt) - 1) + targets[i]
        inputs.append(seq + [enc.eot_token] * (L - len(seq)))
        labels.append(lab + [-1] * (L - len(lab)))
    return torch.tensor(inputs, device=device), torch.tensor(labels, device=device)


def warm_start(model, train_model, args, enc, task, sft_path, sft_key, stop, log, device, ctx, rank, world_size):
    """Stage 1, standing in for pretraining: next-token cross-entropy on the reference answers,
    half of the problems shown with c (so the teacher view learns to read it, whatever its kind, at
    the noise RL will see), until the student view solves --sft_until of a validation set and the
    teacher view --sft_teacher_until of it; saved to sft.pt."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=args.weight_decay)
    sft_rng = np.random.default_rng([args.seed, rank, 0])
    # validation problems for --sft_until: training-distribution problems, never the eval set
    val_set = task.sample(np.random.default_rng([args.seed, 2]), 256)
    t_start = time.time()
    for step in range(args.sft_steps):
        x, y = sft_batch(enc, task, sft_rng, args.sft_batch // world_size, args.sft_hint_frac, device)
        with ctx:
            h = train_model(x, return_hidden=True)[y >= 0]  # (n, H): the head only where a label is
        # mean over this rank's response tokens (every row has the same number); DDP averages ranks
        loss = -chunked_token_logprobs(h, model.lm_head_weight, y[y >= 0], 1.0, args.kl_chunk).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        # Ctrl-C: under DDP the ranks agree every 25 steps (an all-reduce and a host sync each time)
        if (not dist.is_initialized() or (step + 1) % 25 == 0 or step + 1 == args.sft_steps) and stop.any_rank(device):
            print0("interrupted during the warm start: nothing saved (sft.pt is written when it completes)")
            return False
        if (step + 1) % 100 == 0 or step + 1 == args.sft_steps:
            elapsed = time.time() - t_start
            eta = elapsed / (step + 1) * (args.sft_steps - step - 1)
            loss_avg = all_sum(loss.detach().clone()).item() / world_size
            print0(f"sft {step + 1}/{args.sft_steps} | loss {loss_avg:.4f} | {elapsed:.0f}s | "
                   f"eta {eta:.0f}s{' at most' if args.sft_until else ''}")
            log({"phase": "sft", "step": step + 1, "loss": loss_avg, "time": elapsed})
        if args.sft_until > 0 and (step + 1) % 25 == 0:
            acc, teacher_acc = evaluate(model, enc, task, val_set, rank, world_size, args.max_new_tokens, device, ctx)
            if acc >= args.sft_until and teacher_acc >= args.sft_teacher_until:
                print0(f"sft {step + 1}/{args.sft_steps} | val acc {acc:.3f} >= {args.sft_until}, teacher "
                       f"{teacher_acc:.3f}: warm start done")
                log({"phase": "sft", "step": step + 1, "val_acc": acc, "val_teacher_acc": teacher_acc})
                break
    if rank == 0:
        try:
            save_atomic({"model": model.state_dict(), "model_args": sft_key["model_args"], "key": sft_key}, sft_path)
        except OSError as e:
            die(f"saving {sft_path}: {e.strerror or e}")
    return True


# -----------------------------------------------------------------------------
# DAPO dynamic sampling (--filter_groups)

def group_has_signal(rewards, group_size):
    """True for each group whose rewards are not all equal, the only groups with A != 0.
    (N*G,) -> (N,) bool. DAPO's dynamic sampling (--filter_groups) keeps only these."""
    r = rewards.view(-1, group_size)
    return r.amax(1) != r.amin(1)


def take_groups(batch, keep, group_size):
    """The groups of a rollout batch where keep (N,) is True. batch: per-prompt tensors x, cx, y (N, .)
    and per-rollout tensors resp, mask (N*G, Tr) and rewards (N*G,), each group's G rows consecutive."""
    rows = keep.repeat_interleave(group_size)
    return {k: v[keep] if k in ("x", "cx", "y") else v[rows] for k, v in batch.items()}


def cat_rollouts(batches, eot):
    """Rollout batches joined along the batch; responses right-padded with eot (mask 0) to the longest."""
    T = max(b["resp"].size(1) for b in batches)
    pad = {"resp": eot, "mask": 0}
    return {k: torch.cat([F.pad(b[k], (0, T - b[k].size(1)), value=pad[k]) if k in pad else b[k] for b in batches])
            for k in batches[0]}


def dynamic_sampling(next_batch, n_prompts, group_size, max_batches, eot):
    """DAPO dynamic sampling: draw rollout batches from next_batch() and keep the groups whose rewards
    are not all equal until n_prompts groups are kept or max_batches were drawn; if still short, fill
    up with dropped groups. Returns the batch of n_prompts groups and the list of every batch drawn."""
    batches, signal = [], []
    while len(batches) < max_batches and sum(int(s.sum()) for s in signal) < n_prompts:
        batches.append(next_batch())
        signal.append(group_has_signal(batches[-1]["rewards"], group_size))
    kept = [take_groups(b, s, group_size) for b, s in zip(batches, signal)]
    dropped = [take_groups(b, ~s, group_size) for b, s in zip(batches, signal)]
    pool = cat_rollouts(kept + dropped, eot)
    first = torch.arange(len(pool["x"]), device=pool["x"].device) < n_prompts
    return take_groups(pool, first, group_size), batches


# -----------------------------------------------------------------------------
# evaluation

CONTEXT_SEED = 4321  # draws the held-out problems' contexts (partial, noisy, irrelevant) in evaluate


def first_wrong(resp, mask, target):
    """(B, Tr) bool, True at the first response token that differs from the reference response
    target (B, Ty) (the answer and end-of-text): where a wrong rollout goes wrong. A correct
    rollout has none; stopping early counts as wrong at its end-of-text."""
    n = min(resp.size(1), target.size(1))
    differ = torch.ones_like(mask, dtype=torch.bool)  # past the reference: wrong (or masked)
    differ[:, :n] = resp[:, :n] != target[:, :n]
    differ &= mask.bool()
    return differ & (differ.cumsum(1) == 1)


def verify(enc, task, resp, problems, group_size=1):
    """The verifier's reward of each response row; rows b*G .. b*G+G-1 answer problems[b]."""
    return [task.reward(decode_response(enc, r), problems[i // group_size]) for i, r in enumerate(resp.tolist())]


@torch.no_grad()
def evaluate(model, enc, task, problems, rank, world_size, max_new_tokens, device, ctx):
    """Greedy accuracy of the student view (prompt x) and the teacher view (prompt c + x) on the
    held-out problems, sharded over ranks as range(rank, N, world_size). The contexts are drawn
    for all the problems from one fixed seed: the same at every evaluation and any world size."""
    mine = problems[rank::world_size]
    views = [v[rank::world_size] for v in encode_batch(enc, task, problems, np.random.default_rng(CONTEXT_SEED))[:2]]
    correct = torch.zeros(3, device=device)  # student, teacher, count
    if mine:
        for i, prompts in enumerate(views):
            with ctx:
                resp, _ = model.generate(torch.tensor(prompts, device=device), max_new_tokens, enc.eot_token, temperature=0)
            correct[i] = sum(verify(enc, task, resp, mine))
    correct[2] = len(mine)
    s, t, n = all_sum(correct).tolist()
    return s / n, t / n


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k), the chance
    that k samples drawn without replacement from the n contain a correct one (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@torch.no_grad()
def sampled_eval(model, enc, task, problems, rank, world_size, max_new_tokens, device, ctx, n, seed):
    """n temperature-1 samples of the student view per held-out problem: mean@n (the mean accuracy
    over all samples, the paper's metric) with a 95% interval over problems, and pass@k for
    k = 1 and n. Sampling uses its own generator, so evaluating never moves the training streams."""
    mine = problems[rank::world_size]
    stats = [0.0] * 5  # sum acc, sum acc^2, pass@1, pass@n, problems
    if mine:
        student = encode_batch(enc, task, mine, np.random.default_rng(CONTEXT_SEED))[0]  # contexts unused
        gen = torch.Generator(device=device).manual_seed(seed + rank)
        with ctx:
            resp, _ = model.generate(torch.tensor(student, device=device), max_new_tokens, enc.eot_token, n, 1.0, gen)
        r = verify(enc, task, resp, mine, n)
        for i in range(len(mine)):
            c = int(sum(r[i * n:(i + 1) * n]))
            for j, v in enumerate((c / n, (c / n) ** 2, pass_at_k(n, c, 1), pass_at_k(n, c, n), 1.0)):
                stats[j] += v
    s1, s2, p1, pn, N = all_sum(torch.tensor(stats, dtype=torch.float64, device=device)).tolist()
    mean = s1 / N
    half = 1.96 * math.sqrt(max(0.0, s2 / N - mean ** 2) / max(1.0, N - 1))  # normal interval over problems
    return {f"mean@{n}": mean, f"mean@{n}_ci95": half, "pass@1": p1 / N, f"pass@{n}": pn / N}


# -----------------------------------------------------------------------------
# loss diagnostics (--diag_every)

def kl_estimators(logp, logq):
    """Sampled-token estimators of KL(p || q) from y ~ p, with log r = log p(y) - log q(y):
    k1 = log r (unbiased, high variance, can be negative), k2 = 0.5 (log r)^2 (biased, low variance),
    k3 = q/p - 1 - log(q/p) = exp(-log r) - 1 + log r (unbiased, >= 0). Shapes are kept."""
    log_r = logp - logq
    return log_r, 0.5 * log_r ** 2, torch.exp(-log_r) - 1 + log_r


def loss_diagnostics(model, ref_model, mb, terms, args, world_size):
    """On the step's first mini-batch before its update (so the rollouts are exactly on-policy):
    the gradient norm of each loss term on its own (terms: minibatch_loss's split of the loss on
    the unwrapped model), the cosine between the outcome and distillation gradients (averaged over
    ranks like DDP's), and for the student-teacher and policy-reference pairs the exact KL next to
    k1, k2, k3 (mean and std over the response tokens of all ranks). Touches no .grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    out, grads = {}, {}
    # the gradients, their norms and the cosine in the parameters' dtype (fp32), outside autocast
    # (which would take the dot product in bf16), as loss.backward() runs outside it in training
    with torch.autocast(params[0].device.type, enabled=False):
        for k, term in terms.items():
            g = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            flat = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)])
            grads[k] = all_sum(flat) / world_size
            out[f"grad_norm_{k}"] = grads[k].norm().item()
        if "opd" in grads and "out" in grads and grads["opd"].norm() > 0 and grads["out"].norm() > 0:  # no cosine of a zero vector
            out["grad_cos_out_opd"] = (grads["out"] @ grads["opd"] / (grads["out"].norm() * grads["opd"].norm())).item()
    with torch.no_grad():
        T, C, W, m, resp = args.temperature, args.kl_chunk, model.lm_head_weight, mb["mask"], mb["resp"]
        G = args.group_size
        h = response_hidden(model, mb["student"], resp).flatten(0, 1)
        logp = chunked_token_logprobs(h, W, resp.flatten(), T, C)
        pairs = {"ref": ref_model.score(mb["student"][::G], resp, G).flatten(0, 1)}
        if "h_teacher" in mb:
            pairs["teacher"] = mb["h_teacher"].flatten(0, 1)
        for name, h_other in pairs.items():
            exact = fused_reverse_kl(h, h_other, W, T, C)  # full vocabulary, as in the loss
            logq = chunked_token_logprobs(h_other, W, resp.flatten(), T, C)
            for est, v in zip(("exact", "k1", "k2", "k3"), (exact, *kl_estimators(logp, logq))):
                v, w = v.view(resp.shape), m
                s = all_sum(torch.stack([(v * w).sum(), (v * v * w).sum(), w.sum()]).double())
                mean = (s[0] / s[2]).item()
                out[f"{est}_{name}"] = mean
                out[f"{est}_{name}_std"] = max(0.0, (s[1] / s[2]).item() - mean ** 2) ** 0.5
    return out
