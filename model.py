"""
A compact GPT: pre-LayerNorm blocks, causal self-attention through
F.scaled_dot_product_attention, learned positions, output head tied to the token
embedding. Batched sampling with a KV cache for rollouts and evaluation, shared-prefix
scoring for the no-grad passes, and the output head applied in chunks for the training loss
(log-probs, entropy and the exact reverse KL with its closed-form backward) in chunks of about
24 MB of logits, so that at an LLM's vocabulary no (tokens, vocab) tensor of a whole batch is
formed (at this task's 258 tokens one chunk holds every row: chunk_rows).
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
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, cache=None, n_pad=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, nh, T, hs)
        if n_pad is not None:  # left-padded rows: no query attends to a row's first n_pad keys
            pos = cache.pos if cache is not None else 0  # keys already cached before these T
            if cache is not None:
                k, v = cache.update(k, v)
            key = torch.arange(pos + T, device=q.device)
            query = torch.arange(pos, pos + T, device=q.device)
            allowed = (key[None] <= query[:, None]) & (key[None, None] >= n_pad[:, None, None])
            allowed |= key[None] == query[:, None]  # (B, T, pos+T); a padding query sees itself
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        elif cache is None:  # a whole sequence (the training forward): causal
            # decided by `cache is None`, a Python constant, never by T: under torch.compile T may
            # be symbolic, and `is_causal=T > 1` (a SymBool) broke the graph and recompiled per
            # length
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # sampling and scoring with a KV cache (eager only: T and cache.pos are Python ints)
            pos = cache.pos  # keys already cached before these T positions
            k, v = cache.update(k, v)  # (B, nh, pos + T, hs): every earlier position, then these
            if pos == 0 or T == 1:  # a prefill is causal; one new query sees every key
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            else:  # a chunk after cached keys: query i sees the pos cached keys and chunk keys 0..i
                allowed = torch.ones(T, pos + T, dtype=torch.bool, device=q.device)
                allowed = allowed.tril(diagonal=pos)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd))

    def forward(self, x, cache=None, n_pad=None):
        x = x + self.attn(self.ln_1(x), cache, n_pad)
        return x + self.mlp(self.ln_2(x))


class LayerCache:
    """Keys and values of one layer, allocated at the first update for max_len positions
    (in the dtype the layer computes in, which autocast may lower)."""

    def __init__(self, max_len):
        self.k = self.v = None  # (B, nh, max_len, hs) each, once allocated
        self.pos, self.max_len = 0, max_len

    def update(self, k, v):
        B, nh, T, hs = k.shape
        if self.k is None:
            self.k, self.v = (k.new_zeros(B, nh, self.max_len, hs) for _ in range(2))
        self.k[:, :, self.pos:self.pos + T] = k
        self.v[:, :, self.pos:self.pos + T] = v
        self.pos += T
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def lm_head_weight(self):
        return self.wte.weight  # tied: logits = hidden @ wte.weight.T

    def hidden(self, idx, caches=None, n_pad=None):
        """Final hidden states (B, T, C) of token ids idx (B, T); with caches, idx continues them.
        n_pad (B,), or None for none: row b starts with n_pad[b] padding tokens (left padding), to
        which no position attends, and its positions count from its first real token, so a row's
        states equal those of its unpadded sequence."""
        pos0 = caches[0].pos if caches is not None else 0
        T = idx.size(1)
        assert pos0 + T <= self.config.block_size, \
            f"sequence of {pos0 + T} > block_size {self.config.block_size}"
        pos = torch.arange(pos0, pos0 + T, device=idx.device)
        if n_pad is not None:
            pos = (pos[None] - n_pad[:, None]).clamp(min=0)  # (B, T)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None, n_pad)
        return self.ln_f(x)

    def forward(self, idx, return_hidden=False, n_pad=None):
        """Logits (B, T, V) for token ids idx (B, T); with return_hidden, the final hidden states
        (B, T, C) instead, for a caller that applies the head in chunks (logits = h @ W.T).
        n_pad: left padding of each row, as in hidden()."""
        h = self.hidden(idx, n_pad=n_pad)
        return h if return_hidden else h @ self.lm_head_weight.T

    def _prefill(self, prompts, max_len, num_samples, n_pad=None):
        """Run prompts (B, Tp) once into fresh caches, then share each prompt's keys and values
        among num_samples consecutive rows. Returns the last hidden state (B*G, 1, C), the caches
        and the rows' left padding (B*G,) (None if none)."""
        caches = [LayerCache(max_len) for _ in self.blocks]
        h = self.hidden(prompts, caches, n_pad)[:, -1:]  # (B, 1, C): only the last is needed
        for c in caches:
            c.k, c.v = c.k.repeat_interleave(num_samples, 0), c.v.repeat_interleave(num_samples, 0)
        n_pad = None if n_pad is None else n_pad.repeat_interleave(num_samples, 0)
        return h.repeat_interleave(num_samples, 0), caches, n_pad

    @torch.no_grad()
    def shared_prefix_hidden(self, prompts, resp, num_samples=1, n_pad=None):
        """Final hidden states (B*G, Tr, C) at the positions that predict each token of resp
        (B*G, Tr), where prompt b (of prompts (B, Tp)) precedes rows b*G .. b*G+G-1 of resp. Each
        prompt runs once and its keys and values are shared by its G responses, so a privileged
        prefix c + x costs one pass per prompt, not one per sample. Equals hidden() on the
        concatenated sequences; no gradient (teacher, pi_old and pi_ref passes). n_pad (B,): the
        prompts' left padding (hidden())."""
        max_len = prompts.size(1) + resp.size(1)
        h, caches, n_pad = self._prefill(prompts, max_len, num_samples, n_pad)
        if resp.size(1) > 1:
            h = torch.cat([h, self.hidden(resp[:, :-1], caches, n_pad)], 1)
        return h

    @torch.no_grad()
    def token_logprobs(self, prompts, resp, num_samples=1, temperature=1.0, n_pad=None):
        """log pi(resp_t | prompt, resp_<t) of every response token (B*G, Tr), prompts (B, Tp)
        each shared by G consecutive rows of resp (shared_prefix_hidden, the head in chunks)."""
        h = self.shared_prefix_hidden(prompts, resp, num_samples, n_pad)  # (B*G, Tr, C)
        return chunked_token_logprobs(h.flatten(0, 1), self.lm_head_weight, resp.flatten(),
                                      temperature).view(resp.shape)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eot, num_samples=1, temperature=1.0, generator=None,
                 n_pad=None):
        """Sample continuations of prompts (B, Tp), left-padded by n_pad (B,) if not None, with a
        KV cache.

        Each prompt is prefilled once and its cache shared by its num_samples samples, which
        come out as consecutive rows. temperature 0 means greedy. A row stops at its first
        eot; later positions hold eot and are masked out. Decoding stops when every row has
        ended, so the output may be shorter than max_new_tokens.

        Returns tokens (B * num_samples, Tr) and mask (B * num_samples, Tr), mask 1 for the
        generated tokens up to and including each row's first eot.
        """
        B, Tp = prompts.shape
        h, caches, n_pad = self._prefill(prompts, Tp + max_new_tokens, num_samples, n_pad)
        done = torch.zeros(B * num_samples, dtype=torch.bool, device=prompts.device)
        tokens, mask = [], []
        for t in range(max_new_tokens):
            # (B*G, V): the head the loss and pi_old use (head_logits), so rollouts are sampled
            # from the distribution that is scored; fp32 (a float64 model's, rounded after)
            logits = head_logits(h[:, -1], self.lm_head_weight).float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, eot), nxt)
            tokens.append(nxt)
            mask.append(~done)
            done = done | (nxt == eot)
            # done.all() waits for the device once per token; it stays: stopping when every row has
            # ended keeps the number of sampling calls, so the random stream and the output shape,
            # the same on every device (running on to max_new_tokens would change both)
            if done.all() or t == max_new_tokens - 1:
                break
            h = self.hidden(nxt[:, None], caches, n_pad)
        return torch.stack(tokens, 1), torch.stack(mask, 1).float()


def response_hidden(model, prompt, resp, n_pad=None):
    """Final hidden states (B, Tr, H) at the positions that predict each response token, for
    either view: on the sequence prompt + resp, position Tp - 1 + t predicts resp[:, t]. Training
    passes the student's x (the teacher's c + x goes through GPT.shared_prefix_hidden, the same
    positions from a KV cache). n_pad (B,): the prompts' left padding (GPT.hidden). model may be
    DDP-wrapped (the call goes through its forward)."""
    seq = torch.cat([prompt, resp[:, :-1]], dim=1)  # (B, Tp + Tr - 1)
    return model(seq, return_hidden=True, n_pad=n_pad)[:, prompt.size(1) - 1:]


# -----------------------------------------------------------------------------
# The lm_head in chunks: the training loss needs, per response token, the log-prob of the sampled
# token, the entropy and the exact KL over the whole vocabulary, and need not hold the (N, V)
# logits of all N tokens at once (at V = 50k and N = 4k one fp32 copy is 0.8 GB): they run the
# head on chunk_rows rows at a time. At this task's V = 258 one chunk holds every row.

def chunk_rows(chunk_size, vocab_size):
    """Rows per lm_head chunk: chunk_size, or for 0 about 24 MB of fp32 logits per chunk: 119 rows
    at V = 50304, 23,255 at V = 258 (this task's vocabulary, so there a chunk holds every row of a
    mini-batch and chunking only starts to matter at a vocabulary of LLM size). Larger chunks were
    slower on CPU (see tools/bench.py)."""
    return chunk_size or max(1, 6_000_000 // vocab_size)


def head_logits(hidden, weight):
    """The output head, logits hidden @ weight.T in fp32 at least with autocast off (autocast
    would lower the matmul to bf16): (n, H), (V, H) -> (n, V). Sampling and every log-prob use
    it."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.to(dtype) @ weight.to(dtype).T


def _log_softmax(hidden, weight, temperature):
    """log softmax(hidden @ weight.T / temperature) in fp32 at least: (n, H), (V, H) -> (n, V)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return F.log_softmax(head_logits(hidden, weight) / temperature, dim=-1)


class FusedReverseKL(torch.autograd.Function):
    """KL(p || SG q) per row, p = softmax(hs @ W.T / tau), q = softmax(ht @ Wt.T / tau), chunk
    by chunk. Backward recomputes each chunk and applies the closed form dKL/dz = p (log p - log q
    - KL) (z the student's scaled logits), so at most one (chunk, V) block is alive at a time."""

    # Both passes run with autocast off on whatever device the tensors are on, and compute in fp32
    # at least (_log_softmax upcasts each chunk; the backward's products upcast to the fp32 dkl_dz).
    # torch.amp.custom_fwd/custom_bwd(device_type="cuda") did this for CUDA only: under CPU
    # autocast, a backward called inside the autocast region (autograd.grad) ran in bf16.

    @staticmethod
    def forward(ctx, hs, ht, weight, teacher_weight, temperature, chunk_size):
        with torch.autocast(hs.device.type, enabled=False):
            return FusedReverseKL._forward(ctx, hs, ht, weight, teacher_weight, temperature,
                                           chunk_size)

    @staticmethod
    def _forward(ctx, hs, ht, weight, teacher_weight, temperature, chunk_size):
        kl = torch.empty(hs.size(0), dtype=torch.promote_types(hs.dtype, torch.float32),
                         device=hs.device)
        for i in range(0, hs.size(0), chunk_size):
            logp = _log_softmax(hs[i:i + chunk_size], weight, temperature)
            logq = _log_softmax(ht[i:i + chunk_size], teacher_weight, temperature)
            kl[i:i + chunk_size] = (logp.exp() * (logp - logq)).sum(-1)
        # one chunk keeps dKL/dz for backward (it is the one block anyway); several recompute it
        ctx.dkl_dz = logp.exp() * (logp - logq - kl[:, None]) if hs.size(0) <= chunk_size else None
        ctx.save_for_backward(hs, ht, weight, teacher_weight, kl)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        with torch.autocast(grad_kl.device.type, enabled=False):
            return FusedReverseKL._backward(ctx, grad_kl)

    @staticmethod
    def _backward(ctx, grad_kl):
        hs, ht, weight, teacher_weight, kl = ctx.saved_tensors
        tau, C = ctx.temperature, ctx.chunk_size
        grad_hs = torch.zeros_like(hs)
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device)
        for i in range(0, hs.size(0), C):
            if ctx.dkl_dz is not None:
                dkl_dz = ctx.dkl_dz
            else:
                logp = _log_softmax(hs[i:i + C], weight, tau)
                logq = _log_softmax(ht[i:i + C], teacher_weight, tau)
                dkl_dz = logp.exp() * (logp - logq - kl[i:i + C, None])  # p (log p - log q - KL)
            g = grad_kl[i:i + C, None] * dkl_dz / tau  # (chunk, V); the 1/tau from z = h W^T / tau
            grad_hs[i:i + C] = (g @ weight.to(g.dtype)).to(hs.dtype)
            grad_w += (g.T @ hs[i:i + C].to(g.dtype)).to(grad_w.dtype)  # summed in fp32 at least
        ctx.dkl_dz = None
        return grad_hs, None, grad_w.to(weight.dtype), None, None, None  # none to the teacher


def fused_reverse_kl(student_hidden, teacher_hidden, weight, temperature=1.0, chunk_size=0,
                     teacher_weight=None):
    """Per-token KL(softmax(student_hidden @ weight.T / tau) || SG softmax(teacher_hidden @ W_t.T
    / tau)), (N, H), (N, H), (V, H) -> (N,), one (chunk_rows, V) block of logits at a time (at
    V = 258 one chunk holds every row; chunks matter at LLM vocabularies). W_t is teacher_weight,
    the teacher's own output matrix (a frozen teacher's differs), or weight when None. Gradients
    reach student_hidden and weight through the student side only. Equals full_vocab_reverse_kl
    on the two views' logits."""
    chunk_size = chunk_rows(chunk_size, weight.size(0))
    teacher_weight = (weight if teacher_weight is None else teacher_weight).detach()
    return FusedReverseKL.apply(student_hidden, teacher_hidden.detach(), weight, teacher_weight,
                                temperature, chunk_size)


def chunked_token_logprobs(hidden, weight, tokens, temperature=1.0, chunk_size=0):
    """log softmax(hidden @ weight.T / tau)[tokens], tau the temperature, chunk by chunk: (N, H),
    (V, H), (N,) -> (N,). With grad enabled each chunk is checkpointed, its logits recomputed in
    backward, never stored."""
    def chunk_logp(h, t):
        return torch.gather(_log_softmax(h, weight, temperature), -1, t[:, None]).squeeze(-1)
    chunk_size = chunk_rows(chunk_size, weight.size(0))
    if hidden.size(0) <= chunk_size:  # one chunk: nothing to save by recomputing
        return chunk_logp(hidden, tokens)
    out = []
    for i in range(0, hidden.size(0), chunk_size):
        h, t = hidden[i:i + chunk_size], tokens[i:i + chunk_size]
        out.append(checkpoint(chunk_logp, h, t, use_reentrant=False) if torch.is_grad_enabled()
                   else chunk_logp(h, t))
    return torch.cat(out)


@torch.no_grad()
def chunked_entropy(hidden, weight, temperature=1.0, chunk_size=0):
    """Exact entropy -sum_a p(a) log p(a) per row, chunk by chunk: (N, H), (V, H) -> (N,)."""
    chunk_size = chunk_rows(chunk_size, weight.size(0))
    out = []
    for i in range(0, hidden.size(0), chunk_size):
        logp = _log_softmax(hidden[i:i + chunk_size], weight, temperature)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)
