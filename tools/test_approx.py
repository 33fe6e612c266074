"""
Tests for tools/approx.py, the approximations of SDPG's distillation term: each against a float64
loop over tokens and vocabulary entries (value and gradient), the top-k ones at k = V against the
exact term sdpg.full_vocab_reverse_kl, the sampled-token gradient's expectation (every token
enumerated, weighted by p) against the exact gradient, and k = 1 cases worked by hand. CPU only,
a few seconds:

    python -m pytest -q tools/test_approx.py
"""
import math
import os
import sys

import pytest
import torch
from torch.testing import assert_close

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/
import sdpg  # noqa: E402
from approx import (exact_reverse_kl, sampled_token, topk_left_out_mass,  # noqa: E402
                    topk_student_renorm, topk_student_tail, topk_teacher_renorm)

TOPK = {"topk_student_renorm": topk_student_renorm, "topk_student_tail": topk_student_tail,
        "topk_teacher_renorm": topk_teacher_renorm}


# ---- the float64 loop: one token and one vocabulary entry at a time -----------------------------

def loop_probs(z, temperature):
    """softmax(z / tau) one entry at a time, as a list of float64 scalars that carry autograd:
    p(a) = exp(z_a / tau) / sum_b exp(z_b / tau). (V,) -> list of V scalars."""
    e = []
    for a in range(z.size(0)):
        e.append(torch.exp(z[a] / temperature))
    total = sum(e)
    p = []
    for a in range(z.size(0)):
        p.append(e[a] / total)
    return p


def loop_kl(p, q, support):
    """sum_{a in support} p(a) (log p(a) - log q(a)), one entry at a time."""
    kl = 0.0
    for a in support:
        kl = kl + p[a] * (torch.log(p[a]) - torch.log(q[a]))
    return kl


def loop_top(z, k):
    """The k entries of z with the largest values, by sorting plain Python floats."""
    values = z.tolist()
    order = sorted(range(len(values)), key=values.__getitem__, reverse=True)
    return order[:k]


def loop_method(name, zs, zt, arg, temperature):
    """The named method's per-token value, token by token in float64: (N, V) x2 -> (N,).
    Renormalised: p_S(a) = p(a) / sum_{b in S} p(b), likewise q_S, KL over S. Tail: KL over S plus
    the bucket p(T) = sum_{a not in S} p(a), likewise q(T). Sampled: SG(log p(y) - log q(y))
    log p(y). Exact: KL over every entry."""
    out = []
    for i in range(zs.size(0)):
        p = loop_probs(zs[i], temperature)
        q = loop_probs(zt[i].detach(), temperature)
        V = len(p)
        if name == "exact":
            out.append(loop_kl(p, q, range(V)))
        elif name == "sampled_token":
            y = int(arg[i])
            ratio = (torch.log(p[y]) - torch.log(q[y])).detach()
            out.append(ratio * torch.log(p[y]))
        else:
            if name == "topk_teacher_renorm":
                support = loop_top(zt[i], arg)
            else:
                support = loop_top(zs[i], arg)
            p_in = sum(p[a] for a in support)
            q_in = sum(q[a] for a in support)
            if name == "topk_student_tail":
                kl = loop_kl(p, q, support)
                rest = [a for a in range(V) if a not in support]
                if rest:
                    p_out = sum(p[a] for a in rest)
                    q_out = sum(q[a] for a in rest)
                    kl = kl + p_out * (torch.log(p_out) - torch.log(q_out))
                out.append(kl)
            else:
                p_s = {a: p[a] / p_in for a in support}
                q_s = {a: q[a] / q_in for a in support}
                out.append(loop_kl(p_s, q_s, support))
    return torch.stack(out)


def value_and_grads(fn, zs0, zt0, w):
    """fn(zs, zt) and the gradient of sum_t w_t fn_t with respect to zs; zt asks for a gradient
    too, and must get none. (N, V) x2, (N,) -> (N,), (N, V)."""
    zs = zs0.clone().requires_grad_()
    zt = zt0.clone().requires_grad_()
    value = fn(zs, zt)
    (value * w).sum().backward()
    assert zt.grad is None or not zt.grad.any(), "a gradient reached the teacher"
    return value.detach(), zs.grad


def inputs(N=4, V=9, scale=2.0, dtype=torch.float64, seed=0):
    """Seeded student and teacher logits (N, V), token weights (N,), and sampled tokens (N,)."""
    g = torch.Generator().manual_seed(seed)
    zs = scale * torch.randn(N, V, generator=g, dtype=dtype)
    zt = scale * torch.randn(N, V, generator=g, dtype=dtype)
    w = torch.rand(N, generator=g, dtype=dtype)
    tokens = torch.randint(0, V, (N,), generator=g)
    return zs, zt, w, tokens


# ---- against the loop ---------------------------------------------------------------------------

class Bound:
    """One method with its extra argument and temperature bound, as fn(zs, zt) -> (N,)."""

    def __init__(self, name, arg, temperature):
        self.name, self.arg, self.temperature = name, arg, temperature

    def __call__(self, zs, zt):
        if self.name == "sampled_token":
            return sampled_token(zs, zt, self.arg, self.temperature)
        if self.name == "exact":
            return exact_reverse_kl(zs, zt, self.temperature)
        return TOPK[self.name](zs, zt, self.arg, self.temperature)

    def loop(self, zs, zt):
        return loop_method(self.name, zs, zt, self.arg, self.temperature)


@pytest.mark.parametrize("name", sorted(TOPK))
@pytest.mark.parametrize("k", [1, 2, 5, 9])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_topk_matches_float64_loop(name, k, temperature):
    zs, zt, w, _ = inputs()
    f = Bound(name, k, temperature)
    assert_close(value_and_grads(f, zs, zt, w), value_and_grads(f.loop, zs, zt, w),
                 rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_token_and_exact_match_float64_loop(temperature):
    zs, zt, w, tokens = inputs()
    for f in (Bound("sampled_token", tokens, temperature), Bound("exact", None, temperature)):
        assert_close(value_and_grads(f, zs, zt, w), value_and_grads(f.loop, zs, zt, w),
                     rtol=1e-10, atol=1e-12)


def test_left_out_mass_matches_loop():
    zs, zt, _, _ = inputs()
    for k in (1, 4, 8, 9):
        for support_logits in (None, zt):
            got = topk_left_out_mass(zs, k, 0.6, support_logits)
            want = []
            for i in range(zs.size(0)):
                p = loop_probs(zs[i], 0.6)
                if support_logits is None:
                    support = loop_top(zs[i], k)
                else:
                    support = loop_top(zt[i], k)
                want.append(1 - sum(p[a] for a in support))
            assert_close(got, torch.stack(want), rtol=1e-10, atol=1e-14)


def test_float32_inputs_compute_in_float32_and_agree():
    zs, zt, w, tokens = inputs()
    for name in ("topk_student_renorm", "topk_student_tail", "topk_teacher_renorm",
                 "sampled_token"):
        arg = tokens if name == "sampled_token" else 4
        f = Bound(name, arg, 0.8)
        v32, g32 = value_and_grads(f, zs.float(), zt.float(), w.float())
        assert v32.dtype == torch.float32
        assert_close((v32.double(), g32.double()), value_and_grads(f, zs, zt, w),
                     rtol=1e-5, atol=1e-6)


# ---- k = V is the exact term --------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TOPK))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_at_full_vocabulary_is_the_exact_term(name, dtype):
    zs, zt, w, _ = inputs(N=5, V=13, scale=3.0, dtype=dtype)
    tau = 0.7

    def exact(a, b):
        return sdpg.full_vocab_reverse_kl(a / tau, b / tau)

    # float32: both sides round differently (log_softmax here, z - logsumexp z there), about
    # 1e-6 on values near 10 and on gradient entries
    tol = {"rtol": 1e-12, "atol": 1e-14}
    if dtype == torch.float32:
        tol = {"rtol": 1e-5, "atol": 1e-5}
    assert_close(value_and_grads(Bound(name, 13, tau), zs, zt, w),
                 value_and_grads(exact, zs, zt, w), **tol)
    assert not topk_left_out_mass(zs, 13, tau).any()  # the tail is empty
    assert_close(exact_reverse_kl(zs, zt, tau), exact(zs, zt), **tol)


def test_tail_bucket_makes_the_top_k_a_lower_bound_and_exact_at_v():
    # KL over a coarsening of the vocabulary (S's entries, and T lumped) is at most the full KL
    # (the data-processing inequality), and it grows to it as k does
    zs, zt, _, _ = inputs(N=6, V=20, scale=3.0)
    full = exact_reverse_kl(zs, zt)
    previous = torch.zeros_like(full)
    for k in range(1, 21):
        tail = topk_student_tail(zs, zt, k)
        assert (tail <= full + 1e-12).all()
        assert (tail >= previous - 1e-12).all()  # S_{k+1}, T_{k+1} refine S_k, T_k
        previous = tail
    assert_close(previous, full, rtol=1e-12, atol=1e-14)


# ---- the sampled token: unbiased in expectation --------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_token_gradient_expectation_is_the_exact_gradient(temperature):
    # sum over every token a of p(a) times the gradient with y = a: enumerated, not sampled
    N, V = 4, 11
    zs, zt, w, _ = inputs(N=N, V=V, scale=2.5)
    p = torch.softmax(zs / temperature, dim=-1)
    expected = torch.zeros_like(zs)
    for a in range(V):
        tokens = torch.full((N,), a, dtype=torch.long)
        _, grad = value_and_grads(Bound("sampled_token", tokens, temperature), zs, zt, w)
        expected = expected + p[:, a:a + 1] * grad
    _, exact_grad = value_and_grads(Bound("exact", None, temperature), zs, zt, w)
    assert_close(expected, exact_grad, rtol=1e-10, atol=1e-13)
    # one sample is not the exact gradient: the estimate has variance
    tokens = torch.zeros(N, dtype=torch.long)
    _, one = value_and_grads(Bound("sampled_token", tokens, temperature), zs, zt, w)
    assert (one - exact_grad).abs().max() > 1e-3


# ---- k = 1 by hand ------------------------------------------------------------------------------

def hand_logits(tau):
    """p = (0.5, 0.3, 0.2), q = (0.2, 0.5, 0.3) as logits at temperature tau: z = tau log p."""
    zs = tau * torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64))
    zt = tau * torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64))
    return zs, zt


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_k1_by_hand(tau):
    zs, zt = hand_logits(tau)
    one = torch.ones(1, dtype=torch.float64)
    # renormalised on one entry, both sides are 1 there: the KL and its gradient are 0
    for name in ("topk_student_renorm", "topk_teacher_renorm"):
        value, grad = value_and_grads(Bound(name, 1, tau), zs, zt, one)
        assert_close(value, torch.zeros(1, dtype=torch.float64))
        assert_close(grad, torch.zeros(1, 3, dtype=torch.float64))
    # tail, k = 1: S = {0}; Bernoulli(p(S) = 0.5) against Bernoulli(q(S) = 0.2):
    # 0.5 log(0.5 / 0.2) + 0.5 log(0.5 / 0.8) = 0.5 log(1.5625) = log 1.25.
    # d/dp(S) = log(0.5 / 0.2) - log(0.5 / 0.8) = log 4, dp(S)/dz_j = p_0 (delta_0j - p_j) / tau
    # = (0.25, -0.15, -0.10) / tau
    value, grad = value_and_grads(Bound("topk_student_tail", 1, tau), zs, zt, one)
    assert_close(value, torch.tensor([math.log(1.25)], dtype=torch.float64))
    want = math.log(4) * torch.tensor([[0.25, -0.15, -0.10]], dtype=torch.float64) / tau
    assert_close(grad, want)
    # what the top 1 leaves out: 1 - 0.5 of the student's own; 1 - 0.3 on the teacher's top 1
    assert_close(topk_left_out_mass(zs, 1, tau), torch.tensor([0.5], dtype=torch.float64))
    assert_close(topk_left_out_mass(zs, 1, tau, zt), torch.tensor([0.7], dtype=torch.float64))
    # sampled y = 1: value log(0.3 / 0.5) log 0.3; gradient log(0.3 / 0.5) (e_1 - p) / tau
    tokens = torch.tensor([1])
    value, grad = value_and_grads(Bound("sampled_token", tokens, tau), zs, zt, one)
    assert_close(value, torch.tensor([math.log(0.6) * math.log(0.3)], dtype=torch.float64))
    want = math.log(0.6) * torch.tensor([[-0.5, 0.7, -0.2]], dtype=torch.float64) / tau
    assert_close(grad, want)


def test_k_out_of_range_is_an_error():
    zs, zt, _, _ = inputs()
    for k in (0, 10):
        with pytest.raises(ValueError, match="must be in"):
            topk_student_renorm(zs, zt, k)
