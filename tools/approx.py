"""
The approximations of the distillation term that other implementations ship, beside SDPG's exact
one, as pure functions of the same inputs.

SDPG trains, per response token t, on the exact reverse KL over the whole vocabulary,

    KL(p_t || SG q_t) = sum_a p(a) (log p(a) - log q(a)),
    p = softmax(z_student / tau), q = softmax(z_teacher / tau), the teacher detached

(sdpg.full_vocab_reverse_kl on logits, model.fused_reverse_kl on hidden states). Each function
below takes the student's logits (N, V), the teacher's logits (N, V) and the temperature tau
(plus k, or the sampled tokens), and returns a per-token value (N,) whose autograd gradient with
respect to the student's logits is the gradient that method trains with:

    topk_student_renorm   S = the student's top k; p and q renormalised on S; KL over S
                          (TRL's distillation_mode="topk_logits", distillation_add_tail=False)
    topk_student_tail     S = the student's top k plus one bucket holding each side's mass
                          outside S; KL over the k + 1 entries (TRL's distillation_add_tail=True,
                          lasgroup/SDPO, rlhf-book)
    topk_teacher_renorm   S = the teacher's top k; p and q renormalised on S; KL over S (TRL's
                          teacher-server path; tinker-cookbook's SDFT recipe takes the same
                          support, but its loss is the forward cross-entropy, not this KL)
    sampled_token         SG(log p(y_t) - log q(y_t)) * log p(y_t), y_t the sampled token (TRL's
                          distillation_mode="sampled_token", its default): one sample whose
                          gradient's expectation under y_t ~ p is the exact gradient

and topk_left_out_mass gives 1 - sum_{a in S} p(a), the student's mass a top-k support leaves out.
Everything runs in fp32 at least, as the exact term does. None of them chunks: each takes the
full (N, V) logits, as the implementations it mirrors do, and forms no (N, V) log-probabilities
it does not need (top-k renormalised: a softmax over the k logits; tail and sampled token:
z - logsumexp z at the entries used). tools/test_approx.py tests each against a float64 loop;
tools/trl_check.py against TRL's own functions; tools/bench_approx.py measures their memory and
time at an LLM's vocabulary.
"""
import torch


def scaled_logits(logits, temperature=1.0, detach=False):
    """z / tau in fp32 at least, (N, V) -> (N, V); detach for the teacher, so that no gradient
    reaches it. At tau = 1 fp32 logits come back as they are: no (N, V) copy."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    if detach:
        z = z.detach()
    # dividing by 1 would only copy an (N, V) block
    if temperature != 1.0:
        z = z / temperature
    return z


def log_probs_at(z, index):
    """log softmax(z) at the given entries only, log p(a) = z_a - logsumexp_b z_b, without
    forming the (N, V) log-probabilities: (N, V), (N, K) int64 -> (N, K)."""
    return torch.gather(z, -1, index) - torch.logsumexp(z, dim=-1, keepdim=True)


def reverse_kl_over(logp, logq):
    """sum_a p(a) (log p(a) - log q(a)) over the last axis, for any support whose entries the
    caller has already made into distributions: (N, K) x2 -> (N,)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def top_k_support(z, k):
    """Indices of the k largest entries of each row of z (the scaled logits), no gradient:
    (N, V) -> (N, k) int64. TRL ranks the temperature-scaled logits too, so near-ties break the
    same way."""
    if not 1 <= k <= z.size(-1):
        raise ValueError(f"k = {k} must be in [1, V = {z.size(-1)}]")
    return torch.topk(z.detach(), k, dim=-1).indices


def log_left_out_mass(z, support):
    """log (1 - sum_{a in S} p(a)), p = softmax(z): the logsumexp of the entries outside S minus
    that of all entries, computed from the entries outside S rather than as 1 minus the
    support's mass, so that a small tail keeps its relative precision. (N, V), (N, k) with
    k < V -> (N,)."""
    outside = z.scatter(-1, support, float("-inf"))
    return torch.logsumexp(outside, dim=-1) - torch.logsumexp(z, dim=-1)


def topk_left_out_mass(student_logits, k, temperature=1.0, support_logits=None):
    """1 - sum_{a in S} p(a), p = softmax(z_s / tau), S the top k of support_logits (the student's
    own logits when None; pass the teacher's for topk_teacher_renorm's support). No gradient.
    (N, V), int -> (N,)."""
    with torch.no_grad():
        if support_logits is None:
            support_logits = student_logits
        zs = scaled_logits(student_logits, temperature)
        support = top_k_support(scaled_logits(support_logits, temperature), k)
        # the support covers everything at k = V: nothing is left out
        if k == zs.size(-1):
            return torch.zeros(zs.shape[:-1], dtype=zs.dtype, device=zs.device)
        return log_left_out_mass(zs, support).exp()


def renormalised_kl(zs, zt, support):
    """KL(p_S || q_S) with both sides renormalised on the support S (N, K) of scaled logits zs,
    zt (N, V): p_S = softmax of the logits on S, so no logsumexp over the vocabulary. -> (N,)."""
    logp_s = torch.log_softmax(torch.gather(zs, -1, support), dim=-1)
    logq_s = torch.log_softmax(torch.gather(zt, -1, support), dim=-1)
    return reverse_kl_over(logp_s, logq_s)


def topk_student_renorm(student_logits, teacher_logits, k, temperature=1.0):
    """KL(p_S || SG q_S) over S = the student's top k, p_S = p / p(S) and q_S = q / q(S) on S:
    sum_{a in S} p_S(a) (log p_S(a) - log q_S(a)). Renormalised on S, p_S = softmax of the
    logits on S, so no logsumexp over the vocabulary is needed. The support is chosen without
    gradient; the gradient flows through p_S only. (N, V), (N, V), int -> (N,)."""
    zs = scaled_logits(student_logits, temperature)
    zt = scaled_logits(teacher_logits, temperature, detach=True)
    return renormalised_kl(zs, zt, top_k_support(zs, k))


def topk_student_tail(student_logits, teacher_logits, k, temperature=1.0):
    """KL over the student's top k plus one tail bucket: with S the student's top k and
    T = the rest, p(T) = 1 - p(S), q(T) = 1 - q(S),
    sum_{a in S} p(a) (log p(a) - log q(a)) + p(T) (log p(T) - log q(T)).
    No renormalisation: the k + 1 entries of each side already sum to 1. At k = V the bucket is
    empty on both sides and the term is the exact KL. (N, V), (N, V), int -> (N,)."""
    zs = scaled_logits(student_logits, temperature)
    zt = scaled_logits(teacher_logits, temperature, detach=True)
    support = top_k_support(zs, k)
    kl = reverse_kl_over(log_probs_at(zs, support), log_probs_at(zt, support))
    # at k = V the tail is empty in every row: 0 log 0 is 0, and leaving it out keeps logsumexp
    # of an all -inf row (whose gradient is NaN) out of the graph
    if k < zs.size(-1):
        logp_tail = log_left_out_mass(zs, support)
        logq_tail = log_left_out_mass(zt, support)
        kl = kl + logp_tail.exp() * (logp_tail - logq_tail)
    return kl


def topk_teacher_renorm(student_logits, teacher_logits, k, temperature=1.0):
    """KL(p_S || SG q_S) over S = the teacher's top k, both renormalised on S:
    sum_{a in S} p_S(a) (log p_S(a) - log q_S(a)), p_S = p / p(S), q_S = q / q(S).
    The support comes from the teacher, so the student's own high-probability tokens outside it
    get no direct pull. (N, V), (N, V), int -> (N,)."""
    zs = scaled_logits(student_logits, temperature)
    zt = scaled_logits(teacher_logits, temperature, detach=True)
    return renormalised_kl(zs, zt, top_k_support(zt, k))


def sampled_token(student_logits, teacher_logits, tokens, temperature=1.0):
    """SG(log p(y) - log q(y)) * log p(y) at the sampled token y of each row, (N, V), (N, V),
    (N,) int64 -> (N,). Its value is not a KL; its gradient (log p(y) - log q(y)) (e_y - p) has,
    for y ~ p, the expectation sum_y p(y) (log p(y) - log q(y)) (e_y - p) = p (log p - log q - KL),
    the exact term's gradient, with one sample's variance. log p(y) = z_y - logsumexp(z): the
    full logits are still formed, the (N, V) log-probabilities are not."""
    zs = scaled_logits(student_logits, temperature)
    zt = scaled_logits(teacher_logits, temperature, detach=True)
    logp_y = log_probs_at(zs, tokens[:, None]).squeeze(-1)
    logq_y = log_probs_at(zt, tokens[:, None]).squeeze(-1)
    return (logp_y - logq_y).detach() * logp_y


def exact_reverse_kl(student_logits, teacher_logits, temperature=1.0):
    """The exact term with the temperature, sum over all V entries of p (log p - log q); equal to
    sdpg.full_vocab_reverse_kl(z_s / tau, z_t / tau). (N, V) x2 -> (N,)."""
    logp = torch.log_softmax(scaled_logits(student_logits, temperature), dim=-1)
    logq = torch.log_softmax(scaled_logits(teacher_logits, temperature, detach=True), dim=-1)
    return reverse_kl_over(logp, logq)


# name -> (function, what its extra argument is); tools/trl_check.py and bench_approx.py read it
METHODS = {
    "topk_student_renorm": (topk_student_renorm, "k"),
    "topk_student_tail": (topk_student_tail, "k"),
    "topk_teacher_renorm": (topk_teacher_renorm, "k"),
    "sampled_token": (sampled_token, "tokens"),
}
