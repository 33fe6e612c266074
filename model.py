"""
A compact GPT (pre-LayerNorm blocks, learned positions, head tied to the token embedding),
with what RL training asks of it:
- generate: batched sampling with a KV cache, for rollouts and evaluation;
- shared_prefix_hidden, token_logprobs: scoring that runs each prompt once for all of its
  samples (the no-grad passes);
- the output head in chunks for the loss: log-probs, entropy, and the exact reverse KL with
  its closed-form backward (FusedReverseKL), so no (tokens, vocab) logits of a whole batch
  are formed at an LLM's vocabulary.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 32     # longest sequence: teacher prompt + response
    vocab_size: int = 258    # set from the tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, cache=None, n_pad=None):
        B, T, C = x.size()  # batch size, sequence length, embedding width (n_embd)
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        pos = 0  # keys already cached before these T positions
        if cache is not None:
            pos = cache.pos
            k, v = cache.update(k, v)  # (B, nh, pos + T, hs)
        if n_pad is not None:
            # left-padded rows: no query attends to its row's first n_pad keys
            key = torch.arange(pos + T, device=q.device)
            query = torch.arange(pos, pos + T, device=q.device)
            causal = key[None] <= query[:, None]  # (T, pos + T)
            real = key[None, None] >= n_pad[:, None, None]  # (B, 1, pos + T)
            allowed = causal & real  # (B, T, pos + T)
            allowed |= key[None] == query[:, None]  # a padding query sees itself
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        elif cache is None:
            # a whole sequence (training): chosen by `cache is None`, a Python constant, never by
            # T, which torch.compile may make symbolic (a test on it recompiles per length)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:  # one new query (sampling): it sees every key
            y = F.scaled_dot_product_attention(q, k, v)
        elif pos == 0:  # a prefill: causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a chunk after pos cached keys: query i sees those and chunk keys 0..i
            allowed = torch.ones(T, pos + T, dtype=torch.bool, device=q.device)
            allowed = allowed.tril(diagonal=pos)  # (T, pos + T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        return x


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, n_pad=None):
        x = x + self.attn(self.ln_1(x), cache, n_pad)
        x = x + self.mlp(self.ln_2(x))
        return x


class LayerCache:
    """Keys and values of one layer for max_len positions, allocated at the first update in
    the dtype the layer computes in (which autocast may lower)."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.pos = 0  # positions filled so far
        self.k = self.v = None  # (B, nh, max_len, hs) each, once allocated

    def update(self, k, v):
        """Append k, v (B, nh, T, hs); return all keys and values so far (B, nh, pos, hs)."""
        B, nh, T, hs = k.shape
        if self.k is None:
            self.k = k.new_zeros(B, nh, self.max_len, hs)
            self.v = v.new_zeros(B, nh, self.max_len, hs)
        end = self.pos + T
        self.k[:, :, self.pos:end] = k
        self.v[:, :, self.pos:end] = v
        self.pos = end
        return self.k[:, :, :end], self.v[:, :, :end]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def lm_head_weight(self):
        return self.wte.weight  # tied: logits = hidden @ wte.weight.T

    def hidden(self, idx, caches=None, n_pad=None):
        """Final hidden states (B, T, C) of token ids idx (B, T); with caches, idx continues
        the sequences they hold. n_pad (B,) or None: row b starts with n_pad[b] padding
        tokens, to which no position attends, and its positions count from its first real
        token, so a row's states equal those of its unpadded sequence."""
        pos0 = 0 if caches is None else caches[0].pos  # positions the caches already hold
        end = pos0 + idx.size(1)
        block_size = self.config.block_size
        assert end <= block_size, f"sequence of {end} > block_size {block_size}"
        pos = torch.arange(pos0, end, device=idx.device)  # (T,)
        if n_pad is not None:
            pos = (pos[None] - n_pad[:, None]).clamp(min=0)  # (B, T)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x = block(x, cache, n_pad)
        return self.ln_f(x)

    def forward(self, idx, return_hidden=False, n_pad=None):
        """Logits (B, T, V) of token ids idx (B, T); with return_hidden, the final hidden
        states (B, T, C) instead, for a caller that applies the head in chunks. n_pad: each
        row's left padding, as in hidden()."""
        h = self.hidden(idx, n_pad=n_pad)
        return h if return_hidden else h @ self.lm_head_weight.T

    def _prefill(self, prompts, max_len, num_samples, n_pad=None):
        """Run prompts (B, Tp) once into fresh caches and share each prompt's keys and values
        among num_samples (G) consecutive rows. Returns the last hidden state (B*G, 1, C),
        the caches and the rows' left padding (B*G,) or None."""
        caches = [LayerCache(max_len) for _ in self.blocks]
        h = self.hidden(prompts, caches, n_pad)[:, -1:]  # (B, 1, C): the last position
        for c in caches:
            c.k = c.k.repeat_interleave(num_samples, 0)  # (B*G, nh, max_len, hs)
            c.v = c.v.repeat_interleave(num_samples, 0)
        if n_pad is not None:
            n_pad = n_pad.repeat_interleave(num_samples, 0)
        return h.repeat_interleave(num_samples, 0), caches, n_pad

    @torch.no_grad()
    def shared_prefix_hidden(self, prompts, resp, num_samples=1, n_pad=None):
        """Final hidden states (B*G, Tr, C) at the positions that predict each token of resp
        (B*G, Tr); prompt b of prompts (B, Tp) precedes rows b*G .. b*G+G-1. Each prompt runs
        once and its keys and values serve its G responses: a privileged prefix c + x costs
        one pass per prompt, not per sample. Equals hidden() on the concatenated sequences,
        without gradient (teacher, pi_old, pi_ref). n_pad (B,): the prompts' left padding."""
        max_len = prompts.size(1) + resp.size(1)
        h, caches, n_pad = self._prefill(prompts, max_len, num_samples, n_pad)  # (B*G, 1, C)
        if resp.size(1) > 1:
            rest = self.hidden(resp[:, :-1], caches, n_pad)  # (B*G, Tr - 1, C)
            h = torch.cat([h, rest], 1)
        return h

    @torch.no_grad()
    def token_logprobs(self, prompts, resp, num_samples=1, temperature=1.0, n_pad=None):
        """log pi(resp_t | prompt, resp_<t) (B*G, Tr) of every token of resp (B*G, Tr), each
        prompt of prompts (B, Tp) shared by G consecutive rows (shared_prefix_hidden)."""
        h = self.shared_prefix_hidden(prompts, resp, num_samples, n_pad)  # (B*G, Tr, C)
        h = h.flatten(0, 1)  # (B*G*Tr, C)
        logp = chunked_token_logprobs(h, self.lm_head_weight, resp.flatten(), temperature)
        return logp.view(resp.shape)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eot, num_samples=1, temperature=1.0,
                 generator=None, n_pad=None):
        """Sample continuations of prompts (B, Tp), left-padded by n_pad (B,) if not None,
        with a KV cache. Each prompt is prefilled once and its cache shared by its num_samples
        (G) samples, consecutive rows. temperature 0 means greedy. A row stops at its first
        eot; later positions hold eot and are masked out. Decoding stops when every row has
        ended, so the output may be shorter than max_new_tokens. Returns tokens (B*G, Tr) and
        mask (B*G, Tr), 1 on the generated tokens up to and including each row's first eot."""
        B, Tp = prompts.shape
        h, caches, n_pad = self._prefill(prompts, Tp + max_new_tokens, num_samples, n_pad)
        done = torch.zeros(B * num_samples, dtype=torch.bool, device=prompts.device)
        tokens, mask = [], []
        for t in range(max_new_tokens):
            # the head the loss and pi_old use, so rollouts come from the distribution scored;
            # sampled in fp32 whatever the model's dtype (a float64 model's logits are rounded)
            logits = head_logits(h[:, -1], self.lm_head_weight).float()  # (B*G, V)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B*G,)
            nxt = torch.where(done, torch.full_like(nxt, eot), nxt)  # ended rows repeat eot
            tokens.append(nxt)
            mask.append(~done)
            done = done | (nxt == eot)
            # stop once every row has ended, though done.all() waits for the device each token:
            # so the number of sampling calls (the random stream, the output's shape) is the
            # same on every device
            if done.all() or t == max_new_tokens - 1:
                break
            h = self.hidden(nxt[:, None], caches, n_pad)  # (B*G, 1, C)
        return torch.stack(tokens, 1), torch.stack(mask, 1).float()


def response_hidden(model, prompt, resp, n_pad=None):
    """Final hidden states (B, Tr, H) at the positions that predict each response token: on
    the sequence prompt + resp, position Tp - 1 + t predicts resp[:, t]. Training passes the
    student's x (the teacher's c + x goes through GPT.shared_prefix_hidden). n_pad (B,): the
    prompts' left padding. model may be DDP-wrapped (the call goes through its forward)."""
    seq = torch.cat([prompt, resp[:, :-1]], dim=1)  # (B, Tp + Tr - 1)
    h = model(seq, return_hidden=True, n_pad=n_pad)  # (B, Tp + Tr - 1, H)
    return h[:, prompt.size(1) - 1:]


# -----------------------------------------------------------------------------
# The output head in chunks: per token the loss needs the sampled token's log-prob, the
# entropy and the exact KL over the vocabulary, but not the (N, V) logits of all N tokens at
# once (at V = 50k and N = 4k one fp32 copy is 0.8 GB).

def chunk_rows(chunk_size, vocab_size):
    """Rows per head chunk: chunk_size, or for 0 about 24 MB of fp32 logits: 119 rows at
    V = 50304, 23,255 at this task's V = 258 (so there one chunk holds every row of a
    mini-batch). Larger chunks were slower on CPU (tools/bench.py)."""
    return chunk_size or max(1, 6_000_000 // vocab_size)


def head_logits(hidden, weight):
    """Logits hidden @ weight.T in fp32 at least, autocast off (it would lower the matmul to
    bf16): (n, H), (V, H) -> (n, V). Sampling and every log-prob use it."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.to(dtype) @ weight.to(dtype).T


def _log_softmax(hidden, weight, temperature):
    """log softmax(hidden @ weight.T / temperature), fp32 at least: (n, H), (V, H) -> (n, V)"""
    with torch.autocast(hidden.device.type, enabled=False):
        return F.log_softmax(head_logits(hidden, weight) / temperature, dim=-1)


class FusedReverseKL(torch.autograd.Function):
    """KL(p || SG q) per row, p = softmax(hs @ W.T / tau), q = softmax(ht @ Wt.T / tau), chunk
    by chunk. Backward recomputes each chunk and applies the closed form

        dKL/dz = p (log p - log q - KL)        (z = hs @ W.T / tau, the student's logits)

    so at most one (chunk, V) block is alive at a time."""

    # Both passes turn autocast off on whatever device the tensors are on and compute in fp32
    # at least (_log_softmax upcasts each chunk, the backward's products upcast to the fp32
    # dkl_dz). torch.amp.custom_fwd/custom_bwd would do this on CUDA only: a backward called
    # inside a CPU autocast region (autograd.grad) would compute in bf16.

    @staticmethod
    def forward(ctx, hs, ht, weight, teacher_weight, temperature, chunk_size):
        N = hs.size(0)
        dtype = torch.promote_types(hs.dtype, torch.float32)
        kl = torch.empty(N, dtype=dtype, device=hs.device)  # (N,)
        with torch.autocast(hs.device.type, enabled=False):
            for i in range(0, N, chunk_size):
                rows = slice(i, i + chunk_size)
                logp = _log_softmax(hs[rows], weight, temperature)  # (chunk, V)
                logq = _log_softmax(ht[rows], teacher_weight, temperature)  # (chunk, V)
                kl[rows] = (logp.exp() * (logp - logq)).sum(-1)
            # one chunk keeps dKL/dz for backward (the only block anyway); several recompute it
            ctx.dkl_dz = None
            if N <= chunk_size:
                ctx.dkl_dz = logp.exp() * (logp - logq - kl[:, None])  # (N, V)
        ctx.save_for_backward(hs, ht, weight, teacher_weight, kl)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hs, ht, weight, teacher_weight, kl = ctx.saved_tensors
        tau = ctx.temperature
        chunk_size = ctx.chunk_size
        grad_hs = torch.zeros_like(hs)
        # grad_w sums over the chunks in fp32 at least
        dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        with torch.autocast(grad_kl.device.type, enabled=False):
            for i in range(0, hs.size(0), chunk_size):
                rows = slice(i, i + chunk_size)
                if ctx.dkl_dz is not None:
                    dkl_dz = ctx.dkl_dz
                else:
                    logp = _log_softmax(hs[rows], weight, tau)
                    logq = _log_softmax(ht[rows], teacher_weight, tau)
                    dkl_dz = logp.exp() * (logp - logq - kl[rows, None])  # (chunk, V)
                g = grad_kl[rows, None] * dkl_dz / tau  # (chunk, V); 1/tau from z = h W^T / tau
                grad_hs[rows] = (g @ weight.to(g.dtype)).to(hs.dtype)
                grad_w += (g.T @ hs[rows].to(g.dtype)).to(grad_w.dtype)
        ctx.dkl_dz = None
        return grad_hs, None, grad_w.to(weight.dtype), None, None, None  # none to the teacher


def fused_reverse_kl(student_hidden, teacher_hidden, weight, temperature=1.0, chunk_size=0,
                     teacher_weight=None):
    """Per-token KL(softmax(hs @ W.T / tau) || SG softmax(ht @ Wt.T / tau)) of student_hidden
    hs (N, H), teacher_hidden ht (N, H) and weight W (V, H) -> (N,), one (chunk_rows, V) block
    of logits at a time. Wt is teacher_weight (a frozen teacher's own head), or W when None.
    Gradients reach hs and W only. Equals full_vocab_reverse_kl on the two views' logits."""
    chunk_size = chunk_rows(chunk_size, weight.size(0))
    if teacher_weight is None:
        teacher_weight = weight
    return FusedReverseKL.apply(student_hidden, teacher_hidden.detach(), weight,
                                teacher_weight.detach(), temperature, chunk_size)


def chunked_token_logprobs(hidden, weight, tokens, temperature=1.0, chunk_size=0):
    """log softmax(hidden @ weight.T / tau)[tokens], tau the temperature, chunk by chunk:
    (N, H), (V, H), (N,) -> (N,). With grad enabled each chunk is checkpointed: its logits
    are recomputed in backward, never stored."""
    def chunk_logp(h, t):  # (n, H), (n,) -> (n,)
        logp = _log_softmax(h, weight, temperature)  # (n, V)
        return torch.gather(logp, -1, t[:, None]).squeeze(-1)

    chunk_size = chunk_rows(chunk_size, weight.size(0))
    if hidden.size(0) <= chunk_size:  # one chunk: nothing to save by recomputing
        return chunk_logp(hidden, tokens)
    out = []
    for i in range(0, hidden.size(0), chunk_size):
        h = hidden[i:i + chunk_size]
        t = tokens[i:i + chunk_size]
        if torch.is_grad_enabled():
            out.append(checkpoint(chunk_logp, h, t, use_reentrant=False))
        else:
            out.append(chunk_logp(h, t))
    return torch.cat(out)


@torch.no_grad()
def chunked_entropy(hidden, weight, temperature=1.0, chunk_size=0):
    """Exact entropy -sum_a p(a) log p(a) per row, chunk by chunk: (N, H), (V, H) -> (N,)."""
    chunk_size = chunk_rows(chunk_size, weight.size(0))
    out = []
    for i in range(0, hidden.size(0), chunk_size):
        logp = _log_softmax(hidden[i:i + chunk_size], weight, temperature)  # (chunk, V)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)
