"""
Tests for the study tools in tools/ (extras.py's contexts and diagnostics, chain.py, study.py,
contexts.py, plot.py, worked_example.py, teacher_signal.py): their tables, statistics, reports and
figures; CPU only. The training algorithm's own tests are in ../test_sdpg.py, whose helpers these use.

    python -m pytest -q test_sdpg.py tools/test_tools.py
"""
import importlib.util
import json
import math
import os
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/, as test_sdpg.py puts it
import data  # noqa: E402
import sdpg  # noqa: E402
import chain  # noqa: E402
import extras  # noqa: E402
from test_sdpg import (ENC, HERE, TINY, brute_force_kl, double, encode, fixed_rollouts, make_run,  # noqa: E402
                       one_line_error, padded, parse, response_logits, run_in_process, run_main, tiny_gpt)


# -----------------------------------------------------------------------------
# tools/extras.py: the sampled-token KL estimators, the loss diagnostics, the context kinds,
# where the KL falls, its flags

def test_kl_estimators_expectations_by_exhaustive_enumeration():
    """Under y ~ p, E[k1] = E[k3] = KL(p || q) exactly; E[k2] differs (it is biased)."""
    torch.manual_seed(9)
    zp, zq = 2 * torch.randn(7, dtype=torch.float64), 2 * torch.randn(7, dtype=torch.float64)
    logp, logq = F.log_softmax(zp, -1), F.log_softmax(zq, -1)
    exact = sdpg.full_vocab_reverse_kl(zp, zq)
    k1, k2, k3 = extras.kl_estimators(logp, logq)  # one value per token y of the vocabulary
    p = logp.exp()
    assert_close((p * k1).sum(), exact)
    assert_close((p * k3).sum(), exact)
    assert abs((p * k2).sum() - exact) > 1e-3
    assert (k3 >= 0).all() and (k1 < 0).any()


def test_loss_diagnostics_against_their_definitions():
    """tools/extras.py: each term's gradient norm and the out/opd cosine from autograd on the terms;
    the exact KL to a reference that is the model itself is 0, to the teacher it is the loss's KL."""
    model = tiny_gpt(torch.float64)
    mb = double(fixed_rollouts(model, 4, seed=12))
    args = parse("--alpha", "0.2", "--opd_gate", "all")
    args.group_size = 1  # every fixed rollout has its own prompt
    n = mb.mask.sum().item()
    diag = extras.loss_diagnostics(make_run(model, args), 0.3, mb)  # reference = the model itself
    _, sums, terms = sdpg.minibatch_loss(model, model.lm_head_weight, mb, n, args, 0.3, 1)
    params = list(model.parameters())
    g = {k: torch.cat([x.flatten() for x in torch.autograd.grad(v, params, retain_graph=True)])
         for k, v in terms.items()}
    assert diag["exact_ref"] == pytest.approx(0, abs=1e-12) and diag["k1_ref"] == pytest.approx(0, abs=1e-12)
    assert diag["exact_teacher"] == pytest.approx((sums["kl_teacher"] / n).item())
    for k in ("out", "ref", "opd"):
        assert diag[f"grad_norm_{k}"] == pytest.approx(g[k].norm().item())
    cos = (g["out"] @ g["opd"] / (g["out"].norm() * g["opd"].norm())).item()
    assert diag["grad_cos_out_opd"] == pytest.approx(cos)


def schoolbook_carries(a, b, digits):
    """The carry into each column of a + b, least significant first, by adding column by column."""
    carries, c = [0], 0
    for i in range(digits):
        c = (a // 10 ** i % 10 + b // 10 ** i % 10 + c) // 10
        carries.append(c)
    return carries


def test_contexts_hand_worked_and_by_their_definitions():
    # 7 + 96 = 103, answer '301' (reversed); 6 + 7 carries into the tens, 0 + 9 + 1 into the hundreds
    assert extras.context_text("answer", 7, 96) == "301" and extras.context_text("hint", 7, 96) == "011"
    assert extras.carry_text(7, 596, 3) == "0110"  # 603: carries out of the units and the tens only
    rng = np.random.default_rng(0)
    a, b = data.sample_problems(rng, 300, np.array([], dtype=np.int64), 3)
    for i, j in zip(a.tolist(), b.tolist()):
        y, hint = data.answer_text(i, j, 3), extras.carry_text(i, j, 3)
        assert [int(ch) for ch in hint] == schoolbook_carries(i, j, 3)
        # the hint is not the answer, but with it each digit is one column's sum mod 10
        assert [(i // 10 ** k % 10 + j // 10 ** k % 10 + int(hint[k])) % 10 for k in range(3)] + [int(hint[3])] \
            == [int(ch) for ch in y]
        part = extras.context_text("partial", i, j, 3, rng)
        assert part.count("?") == 2 and all(p in ("?", t) for p, t in zip(part, y))
        assert extras.context_text("noisy", i, j, 3, rng, 0.0) == y
        wrong = extras.context_text("noisy", i, j, 3, rng, 1.0)
        assert len(wrong) == 4 and sum(p != t for p, t in zip(wrong, y)) == 1 and wrong.isdigit()
        other = extras.context_text("irrelevant", i, j, 3, rng)
        assert other != y and len(other) == 4 and int(other[::-1]) <= 2 * 999  # some problem's sum
    # noise p: one digit wrong in a fraction p of the contexts (binomial, 4000 draws: 5 sigma is 0.036)
    n_wrong = sum(extras.context_text("noisy", 12, 34, 2, rng, 0.3) != "64" + "0" for _ in range(4000))
    assert abs(n_wrong / 4000 - 0.3) < 0.036
    # every kind is the answer's length; an unknown kind or a stray noise is refused
    for kind in extras.CONTEXTS:
        assert len(extras.ContextTask(2, 10, kind).context((7, 96), np.random.default_rng(1))) == 3
    for bad in (dict(context="oracle"), dict(context="answer", noise=0.1), dict(context="noisy", noise=1.5)):
        with pytest.raises(ValueError):
            extras.ContextTask(2, 10, **bad)


def test_first_wrong_token_hand_worked():
    eot = ENC.eot_token
    target = torch.tensor([[51, 48, 49, eot]] * 4)  # '301' then end-of-text
    resp = torch.tensor([[51, 48, 49, eot, eot],   # right: no wrong token
                         [51, 57, 49, eot, eot],   # wrong at the second digit (the later one is right)
                         [52, 57, 50, eot, eot],   # wrong from the first digit on
                         [51, 48, eot, eot, eot]])  # stopped early: wrong at its end-of-text
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]).float()
    got = extras.first_wrong(resp, mask, target)
    assert got.int().tolist() == [[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0]]


def test_kl_location_logs_against_their_definitions():
    """tools/extras.py kl_location: the KL's share on end-of-text tokens and on the first wrong
    token, the KL per token of A > 0 rollouts and their token share, from the float64 KL."""
    model = tiny_gpt(torch.float64)
    mb = double(fixed_rollouts(model, 4, seed=11, eot_last=True))
    args = parse()
    args.group_size = 1  # every fixed rollout has its own prompt
    got = extras.kl_location(make_run(model, args), mb)
    m = mb.mask
    kl = brute_force_kl(response_logits(model, mb.x, mb.resp), mb.h_teacher @ model.lm_head_weight.T) * m
    target = torch.tensor([data.encode_chars(ENC, data.answer_text(*p)) + [ENC.eot_token] for p in mb.problems])
    wrong = extras.first_wrong(mb.resp, m, target)
    pos = (mb.adv > 0).double()[:, None] * m
    assert got["eot_kl_share"] == pytest.approx(((kl * mb.is_eot).sum() / kl.sum()).item())
    assert got["wrong_kl_share"] == pytest.approx(((kl * wrong).sum() / kl.sum()).item())
    assert got["kl_teacher_pos"] == pytest.approx(((kl * pos).sum() / pos.sum()).item())
    assert got["tokens_pos"] == pytest.approx((pos.sum() / m.sum()).item())


@pytest.mark.parametrize("flags, needle", [(["--context", "oracle"], "context"),
                                           (["--context_noise", "0.2"], "context_noise"),
                                           (["--context", "noisy", "--context_noise", "1.5"], "context_noise"),
                                           (["--task", "chain", "--context", "hint"], "context"),
                                           (["--task", "chain", "--context_noise", "0.1"], "context_noise"),
                                           (["--task", "chain", "--eval_size", "0"], "eval_size")])
def test_bad_extras_flags_exit_nonzero_with_one_line(flags, needle, tmp_path, monkeypatch, capsys):
    p = run_main(monkeypatch, capsys, TINY + ["--out_dir", str(tmp_path)] + flags, entry=extras.main)
    assert one_line_error(p, needle), p.stderr


def test_extras_ema_rate_moves_the_teacher_that_far_towards_the_model(tmp_path, monkeypatch):
    """--ema_rate 0.5 with one optimizer step: the teacher starts at the warm start (which pi_ref
    also is) and ends at warm + 0.5 (model - warm), trunk and tied head, computed in float64."""
    monkeypatch.setattr(sdpg, "EMA_RATE", sdpg.EMA_RATE)  # extras.main sets it: restored after
    flags = TINY + ["--sft_until", "0", "--rl_steps", "1", "--num_minibatches", "1", "--teacher", "ema",
                    "--recipe", "release", "--lr", "1e-2", "--ema_rate", "0.5", "--out_dir", str(tmp_path)]
    run = run_in_process(monkeypatch, flags, entry=extras.main)
    assert sdpg.EMA_RATE == 0.5
    for t, m, w in zip(run.teacher_model.parameters(), run.model.parameters(), run.ref_model.parameters()):
        assert_close(t.double(), w.double() + 0.5 * (m.double() - w.double()), rtol=1e-6, atol=1e-7)
    assert run.teacher_model.lm_head_weight is run.teacher_model.wte.weight
    assert not torch.equal(next(run.model.parameters()), next(run.ref_model.parameters()))


@pytest.mark.parametrize("flags", [["--ema_rate", "0.5"], ["--teacher", "ema", "--ema_rate", "0"],
                                   ["--teacher", "ema", "--ema_rate", "1.5"],
                                   ["--teacher", "ema", "--ema_rate", "1.001"]])
def test_bad_ema_rate_exits_nonzero_with_one_line(flags, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sdpg, "EMA_RATE", sdpg.EMA_RATE)
    p = run_main(monkeypatch, capsys, TINY + ["--out_dir", str(tmp_path)] + flags, entry=extras.main)
    assert one_line_error(p, "ema_rate"), p.stderr
    assert sdpg.EMA_RATE == 0.05


def test_extras_ema_rate_one_is_accepted_and_makes_the_teacher_the_model(tmp_path, monkeypatch,
                                                                         capsys):
    """--ema_rate 1, the top of the documented (0, 1]: the run starts (exit 0), and after its one
    optimizer step the teacher has moved all the way, teacher == model (by the definition
    teacher += r (model - teacher)), while the model has left pi_ref (the same start as the
    teacher's), so the default rate 0.05 would have left them apart. No warm start: fast."""
    monkeypatch.setattr(sdpg, "EMA_RATE", sdpg.EMA_RATE)  # extras.main sets it: restored after
    flags = TINY + ["--sft_steps", "0", "--eval_samples", "0", "--eval_size", "10",
                    "--rl_steps", "1", "--num_minibatches", "1", "--teacher", "ema",
                    "--recipe", "release", "--lr", "1e-2", "--ema_rate", "1",
                    "--out_dir", str(tmp_path)]
    try:
        run = run_in_process(monkeypatch, flags, entry=extras.main)
    except SystemExit as e:
        pytest.fail(f"--ema_rate 1 refused: exit {e.code}: {capsys.readouterr().err.strip()}")
    assert sdpg.EMA_RATE == 1
    pairs = zip(run.model.parameters(), run.ref_model.parameters())
    assert any(not torch.equal(m, w) for m, w in pairs)  # the step moved the model
    for t, m in zip(run.teacher_model.parameters(), run.model.parameters()):
        assert_close(t, m, rtol=1e-6, atol=1e-7)


def two_ranks(monkeypatch, fn, model, args, batches):
    """fn(run, mb) on two ranks at once, rank r with batches[r], as two threads of this process:
    sdpg.all_sum waits for both ranks and adds their tensors in place, as dist.all_reduce does.
    Returns both ranks' results."""
    barrier, slot, local, out, errors = threading.Barrier(2, timeout=60), [None, None], \
        threading.local(), [None, None], []

    def all_sum(t):
        slot[local.rank] = t
        barrier.wait()
        total = slot[0] + slot[1]
        barrier.wait()  # both have read both tensors: now each may write its own
        return t.copy_(total)

    def rank(r):
        local.rank = r
        try:
            out[r] = fn(make_run(model, args, rank=r, world_size=2), batches[r])
        except BaseException as e:  # the other rank must not wait for it forever
            errors.append(e)
            barrier.abort()
    monkeypatch.setattr(sdpg, "all_sum", all_sum)
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def test_diagnostics_of_two_ranks_equal_one_process_holding_both_batches(monkeypatch):
    """tools/extras.py loss_diagnostics and kl_location on two ranks (threads whose sdpg.all_sum
    adds both, see two_ranks) with different rollouts and token counts: each rank logs what one
    process holding both batches would, i.e. the normalisations use the tokens of all ranks.
    References: autograd on sdpg.minibatch_loss of each batch over the summed token count (grad
    norms, cosine); the brute-force float64 KL over all the tokens (exact KL mean and std, its
    shares, the A > 0 rows' KL per token and token share)."""
    model = tiny_gpt(torch.float64)
    batches = [double(fixed_rollouts(model, 4, seed=s, eot_last=True)) for s in (11, 14)]
    counts = [mb.mask.sum().item() for mb in batches]
    assert counts[0] != counts[1]  # a rank-local count would give other numbers
    args = parse("--alpha", "0.2", "--opd_gate", "all")
    args.group_size = 1  # every fixed rollout has its own prompt
    diag, diag1 = two_ranks(monkeypatch, lambda run, mb: extras.loss_diagnostics(run, 0.3, mb),
                            model, args, batches)
    loc, loc1 = two_ranks(monkeypatch, extras.kl_location, model, args, batches)
    # one process: the gradient of each term summed over the batches, each over all N tokens
    N, params, g = sum(counts), list(model.parameters()), {}
    for mb in batches:
        _, _, terms = sdpg.minibatch_loss(model, model.lm_head_weight, mb, N, args, 0.3, 1)
        for k, v in terms.items():
            grad = torch.autograd.grad(v, params, retain_graph=True)
            g[k] = g.get(k, 0) + torch.cat([x.flatten() for x in grad])
    for k in ("out", "ref", "opd"):
        assert diag[f"grad_norm_{k}"] == pytest.approx(g[k].norm().item(), rel=1e-9), k
    cos = (g["out"] @ g["opd"] / (g["out"].norm() * g["opd"].norm())).item()
    assert diag["grad_cos_out_opd"] == pytest.approx(cos, rel=1e-9)
    # the KL to the teacher over every response token of both batches
    cat = lambda f: torch.cat([f(mb) for mb in batches])  # noqa: E731
    m = cat(lambda mb: mb.mask)
    kl = cat(lambda mb: brute_force_kl(response_logits(model, mb.x, mb.resp),
                                       mb.h_teacher @ model.lm_head_weight.T)) * m
    tokens = kl[m.bool()]
    assert diag["exact_teacher"] == pytest.approx(tokens.mean().item(), rel=1e-9)
    assert diag["exact_teacher_std"] == pytest.approx(tokens.std(unbiased=False).item(), rel=1e-6)
    target = torch.tensor([data.encode_chars(ENC, data.answer_text(*p)) + [ENC.eot_token]
                           for mb in batches for p in mb.problems])
    wrong = extras.first_wrong(cat(lambda mb: mb.resp), m, target)
    pos = cat(lambda mb: (mb.adv > 0).double()[:, None] * mb.mask)
    eot = cat(lambda mb: mb.is_eot)
    assert loc["eot_kl_share"] == pytest.approx(((kl * eot).sum() / kl.sum()).item())
    assert loc["wrong_kl_share"] == pytest.approx(((kl * wrong).sum() / kl.sum()).item())
    assert loc["kl_teacher_pos"] == pytest.approx(((kl * pos).sum() / pos.sum()).item())
    assert loc["tokens_pos"] == pytest.approx((pos.sum() / m.sum()).item())
    assert diag1 == pytest.approx(diag, rel=1e-12)  # the same global numbers on both ranks
    assert loc1 == pytest.approx(loc, rel=1e-12)


def test_gradient_cosine_is_float32_under_autocast():
    """loss_diagnostics runs inside the bf16 autocast on a GPU; the gradients' norms and cosine must
    still be fp32, not a bf16 dot product (CPU autocast lowers a dot product in the same way)."""
    model = tiny_gpt(torch.float32)
    mb = fixed_rollouts(model, 8, seed=3)
    args = parse("--alpha", "0.2", "--opd_gate", "all")
    args.group_size = 1  # every fixed rollout has its own prompt
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, terms = sdpg.minibatch_loss(model, model.lm_head_weight, mb, mb.mask.sum().item(), args, 0.3, 1)
        diag = extras.loss_diagnostics(make_run(model, args, ctx=torch.autocast("cpu", dtype=torch.bfloat16)), 0.3, mb)
    g = {k: torch.cat([x.flatten() for x in torch.autograd.grad(terms[k], params, retain_graph=True)]).double()
         for k in ("out", "opd")}
    assert diag["grad_cos_out_opd"] == pytest.approx((g["out"] @ g["opd"] / (g["out"].norm() * g["opd"].norm())).item(), abs=1e-6)
    assert diag["grad_norm_out"] == pytest.approx(g["out"].norm().item(), rel=1e-6)


# -----------------------------------------------------------------------------
# tools/plot.py, tools/worked_example.py, tools/teacher_signal.py

def test_plot_draws_a_png_and_rejects_a_non_log(tmp_path):
    pytest.importorskip("matplotlib")
    import plot
    out = plot.plot([os.path.join(HERE, "results", "sdpg_default_cpu.jsonl")], str(tmp_path / "curves.png"))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not"):
        plot.read_log(os.path.join(HERE, "README.md"))


def test_plot_summary_tables_match_the_log(tmp_path):
    """--summary: the evaluation row and the first-ten-steps mean, from a made-up log worked by hand."""
    import plot
    path = tmp_path / "log.jsonl"
    rl = [{"phase": "rl", "step": k, "reward": k / 20, "dt": 0.1 * k} for k in range(1, 21)]
    evals = [{"phase": "eval", "step": k, "eval_acc": 0.25 + k / 100, "teacher_acc": 1.0} for k in (0, 20)]
    path.write_text("\n".join(json.dumps(r) for r in [{"phase": "config"}, evals[0], *rl, evals[1]]))
    md = plot.summary(str(path))
    assert "| `eval_acc` (student, greedy) | 0.250 | 0.450 |" in md
    assert "| `reward` | 0.275 | 0.775 |" in md  # mean of 1..10 / 20 and of 11..20 / 20
    assert "median RL step 1.100 s" in md  # the upper median of 0.1 .. 2.0


def test_worked_example_numbers_agree_with_each_other(tmp_path):
    """tools/worked_example.py: advantages sum to 0 in the group, only A > 0 rows are distilled, and the
    distillation term is beta times the gated per-token KLs of the table over the group's tokens."""
    import worked_example
    model = tiny_gpt()
    args = parse("--group_size", "4")
    task = data.AdditionTask(eval_size=1)
    ex = worked_example.worked_example(model, ENC, task, (7, 96), args, seed=0)
    advs = [r["adv"] for r in ex["rollouts"]]
    assert sum(advs) == pytest.approx(0, abs=1e-5) and len(advs) == 4
    gated = sum(t["kl"] for r in ex["rollouts"] if r["gated_in"] for t in r["tokens"])
    assert all(r["gated_in"] == (r["adv"] > 0) for r in ex["rollouts"])
    assert ex["terms"]["opd"] == pytest.approx(args.beta * min(gated, 1e9) / ex["n_tokens"], rel=1e-4)
    assert "| 0 |" in worked_example.markdown(ex, args)
    if importlib.util.find_spec("matplotlib"):  # the same group as one picture
        path = worked_example.figure(ex, args, str(tmp_path / "group.png"))
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_teacher_signal_table_matches_full_forwards():
    import teacher_signal
    model = tiny_gpt(torch.float64)
    student, teacher, targets = encode([7], [96], 2)
    y = torch.tensor(targets[0])
    rows = teacher_signal.signal_table(model, ENC, data.AdditionTask(2, eval_size=1), 7, 96, y)
    zs = response_logits(model, torch.tensor(student), y[None])[0]  # (Tr, V)
    zt = response_logits(model, torch.tensor(teacher), y[None])[0]
    assert [r[0] for r in rows] == ["3", "0", "1", "<eot>"]
    for t, (_, p, q, kl) in enumerate(rows):
        assert p == pytest.approx(zs[t].softmax(-1)[y[t]].item())
        assert q == pytest.approx(zt[t].softmax(-1)[y[t]].item())
        assert kl == pytest.approx(sdpg.full_vocab_reverse_kl(zs[t], zt[t]).item())


# -----------------------------------------------------------------------------
# tools/study.py and tools/contexts.py: tables, statistics, the grid of runs

def test_study_table_against_hand_computed_seed_statistics(tmp_path):
    """Two arms x two seeds of made-up curves: mean +- sample std, steps to target, and the gaps to
    GRPO of the same seed, worked by hand."""
    import study
    curves = {("grpo", 0): [0.1, 0.2, 0.3], ("grpo", 1): [0.1, 0.3, 0.5],
              ("paper_urkl", 0): [0.1, 0.4, 0.5], ("paper_urkl", 1): [0.1, 0.3, 0.4]}
    for (arm, seed), accs in curves.items():  # sdpg.py logs, as the runs leave them
        os.makedirs(tmp_path / "default" / f"{arm}_s{seed}")
        with open(tmp_path / "default" / f"{arm}_s{seed}" / "log.jsonl", "w") as f:
            f.write(json.dumps({"phase": "config", "eval_size": 1000, "rl_steps": 10}) + "\n")
            rl = {"phase": "rl", "step": 10, "entropy": 0.5, "reward": 0.3}
            if arm == "paper_urkl":  # a diagnostic step: distillation gradient a quarter of the outcome one
                rl.update(kl_teacher=2.0, loss_opd=0.5, grad_norm_out=2.0, grad_norm_opd=0.5, grad_cos_out_opd=0.5)
            f.write(json.dumps(rl) + "\n")
            for i, acc in enumerate(accs):
                f.write(json.dumps({"phase": "eval", "step": 5 * i, "eval_acc": acc, "teacher_acc": 1.0}) + "\n")
    path = study.collect("default", str(tmp_path), str(tmp_path))
    md = study.table(study.load(path), 0.4, ["grpo", "paper_urkl"])
    grpo, sdpg = (line for line in md.splitlines() if line.startswith(("| grpo", "| paper")))
    s = math.sqrt(2 * 0.1 ** 2)  # sample std of two values 0.2 apart
    assert grpo.split(" | ")[2:5] == [f"0.400 ± {s:.3f}", f"0.400 ± {s:.3f}", "10 (1/2 seeds)"]
    # sdpg: final 0.5, 0.4; reaches 0.4 at steps 5 and 10; at step 2 (20% of 10) the nearest
    # evaluation is step 0: gaps 0, 0; final gaps 0.5 - 0.3 = 0.2 and 0.4 - 0.5 = -0.1
    assert "| paper_urkl | 0.250 | 0.50 | 0.250 |" in study.mechanism_table(study.load(path), ["grpo", "paper_urkl"])
    cells = sdpg.split(" | ")
    assert cells[2:7] == [f"0.450 ± {math.sqrt(0.005):.3f}", f"0.450 ± {math.sqrt(0.005):.3f}", "8 (2/2 seeds)",
                          "0.000 ± 0.000", f"0.050 ± {math.sqrt(0.045):.3f}"]


def test_study_landing_and_claims_tables_by_hand(tmp_path):
    """Two warm starts and two arms x two seeds under two floating-point configurations, made up:
    where each warm start landed (step, held-out accuracy at RL step 0, distance to the bar), and
    the paired gaps side by side with how many seeds are ahead, worked by hand."""
    import study
    finals = {"default": {("grpo", 0): 0.3, ("grpo", 1): 0.5, ("release", 0): 0.5, ("release", 1): 0.4},
              "compatible": {("grpo", 0): 0.4, ("grpo", 1): 0.4, ("release", 0): 0.6, ("release", 1): 0.5}}
    for fp, runs in finals.items():
        root = tmp_path / fp
        for seed, (stop, start) in enumerate([(176, 0.21), (190, 0.17)]):
            os.makedirs(root / "default" / f"warm_s{seed}")
            with open(root / "default" / f"warm_s{seed}" / "log.jsonl", "w") as f:
                for r in ({"phase": "config", "eval_size": 1000, "rl_steps": 0},
                          {"phase": "sft", "step": 100, "loss": 0.5},
                          {"phase": "sft", "step": stop, "val_acc": 0.2, "val_teacher_acc": 1.0},
                          {"phase": "eval", "step": 0, "eval_acc": start, "teacher_acc": 1.0}):
                    f.write(json.dumps(r) + "\n")
        for (arm, seed), acc in runs.items():
            os.makedirs(root / "default" / f"{arm}_s{seed}")
            with open(root / "default" / f"{arm}_s{seed}" / "log.jsonl", "w") as f:
                for r in ({"phase": "config", "eval_size": 1000, "rl_steps": 10},
                          {"phase": "rl", "step": 10, "entropy": 0.5, "reward": 0.3},
                          {"phase": "eval", "step": 0, "eval_acc": 0.2, "teacher_acc": 1.0},
                          {"phase": "eval", "step": 10, "eval_acc": acc, "teacher_acc": 1.0}):
                    f.write(json.dumps(r) + "\n")
        study.collect("default", str(root), str(tmp_path), fp)
    assert sorted(os.listdir(tmp_path))[:2] == ["compatible", "default"]
    assert {r["seed"]: (r["sft_steps"], r["eval_acc"]) for r in study.load_warm(
        str(tmp_path / "default_compatible.jsonl")).values()} == {0: (176, 0.21), 1: (190, 0.17)}
    assert "warm" not in study.load(str(tmp_path / "default.jsonl"))  # the arms alone
    landing = study.landing_table("default", str(tmp_path), ["default", "compatible"])
    assert "largest distance from the bar 0.030" in landing  # |0.17 - 0.2|
    assert "| compatible | 0, 1 | 0.210 (176), 0.170 (190) |" in landing
    claims = study.claims_table([("default", "default"), ("default", "compatible")], str(tmp_path))
    row = next(line for line in claims.splitlines() if line.startswith("| release recipe - official"))
    # default: gaps 0.2 and -0.1 (mean 0.05, std sqrt(0.045)); compatible: 0.2 and 0.1
    assert row.split(" | ")[1:] == [f"+0.050 ± {math.sqrt(0.045):.3f} (1/2 ahead)",
                                    f"+0.150 ± {math.sqrt(0.005):.3f} (2/2 ahead) |"]
    assert "| paper recipe - official GRPO, final | - | - |" in claims  # no paper arm: no claim


def finished_process(started, tail=lambda out: [{"phase": "eval", "step": 0}]):
    """A stand-in for subprocess.Popen in study.run_all: a process that has already finished, its
    log written (a config record, then tail(out_dir)) and its sft.pt in place; started collects
    each (out_dir, env)."""
    class Done:
        returncode = 0

        def __init__(self, cmd, stdout, stderr, env):
            out = cmd[cmd.index("--out_dir") + 1]
            started.append((out, env))
            stdout.write("warm start: reusing sft.pt\n")
            with open(os.path.join(out, "log.jsonl"), "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in [{"phase": "config", "rl_steps": 0}] + tail(out)))
            open(os.path.join(out, "sft.pt"), "w").close()

        def poll(self):
            return 0
    return Done


def test_study_runs_each_process_under_its_named_floating_point_configuration(tmp_path, monkeypatch):
    """--fp NAME: every warm start and run gets FLOAT_CONFIGS[NAME]'s variables on top of one
    thread each; the default configuration adds nothing."""
    import study
    seen = []
    monkeypatch.setattr(study.subprocess, "Popen", finished_process(seen))
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    for fp in ("compatible", "default"):
        seen.clear()
        study.run_all(["default"], [0], ["grpo"], 1, str(tmp_path / fp), [], fp=fp)
        assert [os.path.basename(out) for out, _ in seen] == ["warm_s0", "grpo_s0"]
        for _, env in seen:
            assert env["OMP_NUM_THREADS"] == "1"
            assert env.get("MKL_CBWR") == ("COMPATIBLE" if fp == "compatible" else os.environ.get("MKL_CBWR"))
    assert study.FLOAT_CONFIGS["threads2"]["OMP_NUM_THREADS"] == "2"


def test_contexts_summary_against_hand_computed_gaps_and_shares():
    """tools/contexts.py on made-up runs of one context, two seeds: the gaps are paired on the seed at
    step 40 and at the end; the KL share on the first wrong token is weighted by each step's KL; the
    A>0 ratio is the mean over steps with A>0 tokens of their KL per token, over the mean KL per token."""
    import contexts

    def run(accs, teacher=0.8, rl=()):
        ev = [{"step": st, "eval_acc": a, "teacher_acc": teacher} for st, a in zip((0, 40, 200), accs)]
        return {"config": {}, "eval": ev, "rl": list(rl) or [{"entropy": 0.5}]}
    sig = [{"kl_teacher": 1.0, "wrong_kl_share": 0.5, "kl_teacher_pos": 0.4, "tokens_pos": 0.2},
           {"kl_teacher": 3.0, "wrong_kl_share": 0.1, "kl_teacher_pos": 0.0, "tokens_pos": 0.0}]
    runs = {"noise0.3": {"grpo": {0: run([0.2, 0.3, 0.5]), 1: run([0.3, 0.4, 0.6])},
                         "release": {0: run([0.2, 0.35, 0.55], rl=sig), 1: run([0.3, 0.38, 0.7], rl=sig)},
                         "release_beta0": {1: run([0.3, 0.4, 0.65])}}}
    c = contexts.summarize(runs)["noise0.3"]
    assert c["gaps"][("release", "grpo")]["early"] == pytest.approx([0.05, -0.02])
    assert c["gaps"][("release", "grpo")]["final"] == pytest.approx([0.05, 0.1])
    assert c["gaps"][("release", "release_beta0")]["final"] == pytest.approx([0.05])  # seed 1 only
    assert ("paper_urkl", "grpo") not in c["gaps"]
    r = c["arms"]["release"]
    assert r["kl"] == pytest.approx([2.0, 2.0])  # (1 + 3) / 2 steps
    assert r["wrong_share"] == pytest.approx([(0.5 * 1 + 0.1 * 3) / 4] * 2)
    assert r["pos_ratio"] == pytest.approx([0.4 / 2.0] * 2)  # only the first step had A>0 tokens
    md = contexts.tables(contexts.summarize(runs), 2)
    # gaps to GRPO: early 0.05, -0.02 (mean 0.015, std 0.049), final 0.05, 0.1; to beta 0: -0.02, 0.05
    assert ("| noise0.3 | 0.800 ± 0.000 | 0.550 ± 0.071 | +0.015 ± 0.049 / +0.075 ± 0.035 | "
            "-0.020 ± 0.000 / +0.050 ± 0.000 |") in md
    assert "release - release beta 0" in md and "paper - GRPO" not in md


def test_study_leaves_out_a_seed_whose_warm_start_fell_short(tmp_path, monkeypatch, capsys):
    """study.reached reads the warm start's log: a 'reached': False record (sdpg.shortfall's)
    leaves the seed out, with a line; a warm start that stopped at its bar keeps it. run_all (of
    study.py, contexts.py and chain.py) then runs no arm of the seed that fell short."""
    import study

    def warm(name, records):
        d = tmp_path / name
        d.mkdir(parents=True)
        (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(d)
    config = {"phase": "config", "rl_steps": 0}
    landed = warm("warm_s0", [config, {"phase": "sft", "step": 551, "val_acc": 0.3}])
    short = warm("warm_s4", [config, {"phase": "sft", "step": 2000, "loss": 0.15},
                             {"phase": "sft", "reached": False, "val_acc": 0.166}])
    assert study.reached(landed) and capsys.readouterr().out == ""
    assert not study.reached(short)
    assert "short of its bar (val acc 0.166): this seed is left out" in capsys.readouterr().out
    started = []

    def tail(out):  # seed 4's warm start falls short
        return [{"phase": "sft", "reached": False, "val_acc": 0.1}] if out.endswith("warm_s4") \
            else [{"phase": "eval", "step": 0}]
    monkeypatch.setattr(study.subprocess, "Popen", finished_process(started, tail))
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    study.run_all(["default"], [0, 4], ["grpo", "release"], 1, str(tmp_path / "grid"), [])
    assert [os.path.basename(out) for out, _ in started] == ["warm_s0", "warm_s4", "grpo_s0", "release_s0"]
    assert capsys.readouterr().out.count("this seed is left out") == 1


# -----------------------------------------------------------------------------
# the chain task and its metrics and tables (tools/chain.py)

def test_chain_task_hand_worked():
    task = chain.ChainTask(eval_size=200, context="answer")
    p = (3, 7, 5, 2)  # running sums 3, 0, 5, 7
    assert task.prompt(p) == "3752=" and task.answer(p) == "33705527>7" and task.context(p, None) == "7"
    assert chain.ChainTask(eval_size=5, context="derivation").context(p, None) == "33705527>7"
    for text, reward, right in (("33705527>7", 1, True), ("33715527>7", 1, False),  # a lucky slip
                                ("33705528>8", 0, False), (">7", 1, False), ("337055277", 0, False),
                                ("33705527>7>8", 0, False), ("33705527>77", 0, True)):
        assert task.reward(text, p) == reward and task.derivation_right(text, p) is right, text
    assert {len(q) for q in task.eval_set} == {3, 4, 5} and len(set(task.eval_set)) == 200
    train = task.sample(np.random.default_rng(0), 2000)
    assert not set(train) & set(task.eval_set) and {len(q) for q in train} == {3, 4, 5}
    with pytest.raises(ValueError, match="--context"):
        chain.ChainTask(context="hint")


def test_answer_tokens_hand_worked():
    gt = ENC.encode_single_token(">")
    resp = torch.tensor([[1, gt, 2, gt, 3, 256], [1, 2, 3, 256, 256, 256], [gt, 4, 256, 256, 256, 256]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]]).float()
    assert chain.answer_tokens(resp, mask, gt).int().tolist() == [
        [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]


def test_chain_metrics_against_hand_counts_and_brute_force_kl():
    """deriv_acc, won_frac and lucky_frac over scripted rollouts, and the KL per token of each part
    (derivation, answer) and each kind of rollout (rewarded, not) against the full-vocabulary KL."""
    model = tiny_gpt(torch.float64)
    model.config.block_size = 64
    model.wpe = torch.nn.Embedding(64, 32).double()
    task = chain.ChainTask(eval_size=10, context="answer")
    problems = [(3, 7, 5, 2), (1, 2, 3, 4, 5)]  # answers 7 and 5
    texts = ["33705527>7", "33715527>7", "11334>5", "1123364055>5"]  # right, lucky, lucky, right
    G = 2
    resp = [data.encode_chars(ENC, t) + [ENC.eot_token] for t in texts]
    L = max(map(len, resp))
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (L - len(r)) for r in resp])
    resp = torch.tensor([r + [ENC.eot_token] * (L - len(r)) for r in resp])
    student, teacher, _ = data.encode_batch(ENC, task, problems, None)
    (x, x_pad), (cx, cx_pad) = padded(student), padded(teacher)
    rep = lambda t: None if t is None else t.repeat_interleave(G, 0)  # noqa: E731
    mb = sdpg.Batch(problems, rep(x), rep(x_pad), rep(cx), rep(cx_pad), resp, mask, resp == ENC.eot_token,
                    torch.tensor([1.0, 1.0, 1.0, 0.0]), None, None, None,
                    model.shared_prefix_hidden(cx, resp, G, cx_pad), model.lm_head_weight.detach())
    args = parse("--group_size", str(G))
    got = chain.chain_metrics(make_run(model, args, task), mb)
    assert (got["deriv_acc"], got["won_frac"], got["lucky_frac"]) == (0.5, 0.75, 0.5)
    kl = brute_force_kl(response_logits(model, mb.x, resp, mb.x_pad), mb.h_teacher @ model.lm_head_weight.T)
    gt = ENC.encode_single_token(">")
    ans = torch.zeros_like(mask)
    for i, t in enumerate(texts):
        ans[i, t.rindex(">"):len(t) + 1] = 1  # the marker, the digit, the end-of-text
    won = torch.tensor([1.0, 1.0, 1.0, 0.0])[:, None]
    for name, part, rows in (("kl_deriv_pos", mask - ans, won), ("kl_deriv_neg", mask - ans, 1 - won),
                             ("kl_ans_pos", ans, won), ("kl_ans_neg", ans, 1 - won)):
        w = part * rows
        assert got[name] == pytest.approx(((kl * w).sum() / w.sum()).item(), rel=1e-9), name
    assert chain.answer_tokens(resp, mask, gt).float().equal(ans)


def test_chain_study_tables_against_hand_computed_shares_and_gaps():
    """The lucky share of a window is sum lucky_frac / sum won_frac, and a gap row is the mean of
    the per-seed differences of the final greedy accuracies."""
    def run(arm, seed, acc, won, luck):
        rl = [{"step": k + 1, "reward": won, "deriv_acc": 0.1, "won_frac": won, "lucky_frac": luck} for k in range(12)]
        rl[0]["lucky_frac"], rl[-1]["won_frac"] = 0.0, 2 * won  # step 1 in the first window only, step 12 in the last
        greedy = [{"step": 0, "greedy_acc": 0.3, "greedy_deriv_acc": 0.1, "greedy_lucky_share": 0.6},
                  {"step": 12, "greedy_acc": acc, "greedy_deriv_acc": acc / 2, "greedy_lucky_share": 0.4}]
        return {"arm": arm, "seed": seed, "eval": [{"step": 12, "eval_acc": acc, "teacher_acc": 0.9}], "rl": rl,
                "greedy": greedy, "warm": {"sft_steps": 900, "val_acc": 0.3}}
    runs = {"grpo": {0: run("grpo", 0, 0.40, 0.4, 0.2), 1: run("grpo", 1, 0.50, 0.4, 0.2)},
            "release": {0: run("release", 0, 0.46, 0.4, 0.1), 1: run("release", 1, 0.52, 0.4, 0.1)}}
    assert chain.lucky(runs["grpo"][0]["rl"], True) == pytest.approx((9 * 0.2) / (10 * 0.4))
    assert chain.lucky(runs["grpo"][0]["rl"], False) == pytest.approx((10 * 0.2) / (9 * 0.4 + 0.8))
    md = chain.tables(runs, "answer")
    row = next(line for line in md.splitlines() if line.startswith("| release - grpo |"))
    gaps = [0.06, 0.02]  # 0.46 - 0.40, 0.52 - 0.50
    mean, std = sum(gaps) / 2, float(np.std(gaps, ddof=1))
    lucky_gap = (10 * 0.1) / (9 * 0.4 + 0.8) - (10 * 0.2) / (9 * 0.4 + 0.8)
    assert row == f"| release - grpo | 2 | {mean:.3f} ± {std:.3f} | {mean / 2:.3f} ± {std / 2:.3f} | " \
                  f"{lucky_gap:.3f} ± 0.000 | 2/2 |"
    assert "seed 0 900 steps, val acc 0.3" in md


# -----------------------------------------------------------------------------
# pass@k (tools/passk.py)

def test_pass_at_k_equals_brute_force_over_subsets():
    """1 - C(n-c, k)/C(n, k) against the share of the k-subsets of n samples (c of them correct)
    that hold a correct one, every n <= 8, c and k."""
    import itertools
    import passk
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
                assert passk.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_pass_at_k_curve_and_its_interval_against_a_direct_computation():
    import statistics
    import passk
    counts, n = [0, 3, 8, 1, 5, 2, 0, 7], 8
    for k, mean, ci in passk.pass_at_k_curve(counts, n):
        direct = [1 - math.comb(n - c, k) / math.comb(n, k) for c in counts]
        assert mean == pytest.approx(statistics.mean(direct), abs=1e-12)
        assert ci == pytest.approx(1.96 * statistics.stdev(direct) / math.sqrt(len(counts)), abs=1e-12)
    assert passk.pass_at_k_curve(counts, n)[0][1] == pytest.approx(sum(counts) / (n * len(counts)))


def test_pass_at_k_curve_ends_at_pass_at_n_hand_worked():
    """The curve runs k = 1 .. n, n included: pass@n is the share of problems with any correct
    sample (all n drawn), worked by hand; n = 1 still has its one point, pass@1."""
    import passk
    curve = passk.pass_at_k_curve([0, 3, 8, 1], 8)
    assert [k for k, _, _ in curve] == list(range(1, 9))
    k, mean, ci = curve[-1]  # per problem 0, 1, 1, 1: mean 3/4, sample std 1/2
    assert (k, mean, ci) == (8, pytest.approx(0.75), pytest.approx(1.96 * 0.5 / 2))
    assert passk.pass_at_k_curve([0, 1, 1], 1) == [(1, pytest.approx(2 / 3), pytest.approx(
        1.96 * math.sqrt(1 / 3) / math.sqrt(3)))]


class ScriptedSampler:
    """A stand-in for GPT whose generate() reads each prompt row back to its problem (a, b) and
    answers sample s of it right iff s < a % 5, laid out as GPT.generate lays out its samples
    (num_samples consecutive rows per prompt, as test_sdpg's
    test_generate_shares_prefill_and_stops_rows_at_eot checks): so problem (a, b) has
    min(a % 5, n) right samples of n, whatever the batch it came in."""

    def __init__(self, task):
        self.task, self.prompts = task, []

    def generate(self, x, max_new_tokens, eot, n, temperature, gen, n_pad=None):
        rows = []
        for r in x.tolist():
            text = "".join(ENC.decode([t]) for t in r if t != eot)  # left padding off
            a, b = (int(v) for v in text.rstrip("=").split("+"))
            self.prompts.append((a, b))
            for s in range(n):
                answer = self.task.answer((a, b) if s < a % 5 else (a, b + 1))  # else a wrong sum
                rows.append(data.encode_chars(ENC, answer) + [eot])
        resp = torch.tensor(rows)
        return resp, torch.ones_like(resp)


def test_passk_counts_each_problem_s_own_consecutive_samples():
    """sample_correct on 7 problems in batches of 3, n = 4: each problem's count is the number of
    right samples the scripted sampler gave that problem (a brute-force loop over problems and
    samples), not a mix of rows of other problems."""
    import passk
    task = data.AdditionTask(2, eval_size=20)
    problems, n = task.eval_set[:7], 4
    expected = [sum(s < a % 5 for s in range(n)) for a, _ in problems]
    assert len(set(expected)) >= 3  # the problems differ: a mix would show
    sampler = ScriptedSampler(task)
    got = passk.sample_correct(sampler, ENC, task, problems, n, 8, seed=0, batch=3)
    assert sampler.prompts == problems  # every problem sampled once, in order
    assert got == expected


def addition_checkpoint(path, layout, digits, max_new, eval_size=1000):
    """An untrained addition run's ckpt.pt or sft.pt, laid out as sdpg.py saves them (its task's
    repr in the checkpoint, or in sft.pt's key), the block size from sdpg.model_size."""
    from model import GPT, GPTConfig
    args = parse("--digits", str(digits), "--max_new_tokens", str(max_new), "--eval_size",
                 str(eval_size), "--n_layer", "1", "--n_embd", "32", "--n_head", "2")
    task = data.AdditionTask(digits, eval_size)
    model_args = sdpg.model_size(args, task, ENC, 1)
    weights = GPT(GPTConfig(**model_args)).state_dict()
    if layout == "ckpt":
        ckpt = {"model": weights, "model_args": model_args, "config": vars(args),
                "task": repr(task), "step": 1}
    else:
        ckpt = {"model": weights, "key": {"max_new_tokens": max_new, "task": repr(task),
                                          "model_args": model_args}}
    torch.save(ckpt, path)
    return str(path)


def spy_on_sample_correct(monkeypatch):
    """What passk.read hands to sample_correct (which is not run: no sample is right)."""
    import passk
    seen = {}

    def spy(model, enc, task, problems, n, max_new_tokens, seed):
        seen.update(task=task, problems=problems, max_new=max_new_tokens)
        return [0] * len(problems)
    monkeypatch.setattr(passk, "sample_correct", spy)
    return seen


@pytest.mark.parametrize("digits, max_new", [(2, 8), (3, 5), (3, 12)])
def test_passk_reads_the_digits_of_an_addition_checkpoint(digits, max_new, tmp_path, monkeypatch):
    """A checkpoint of a run given --digits and --max_new_tokens: passk.read samples problems of
    those digits, with that --max_new_tokens (a spy on sample_correct)."""
    import passk
    seen = spy_on_sample_correct(monkeypatch)
    passk.read(addition_checkpoint(tmp_path / "ckpt.pt", "ckpt", digits, max_new), 2, 10, 0)
    assert seen["task"].digits == digits and seen["max_new"] == max_new
    assert len(seen["problems"]) == 10
    for a, b in seen["problems"]:
        assert seen["task"].prompt((a, b)) == data.prompt_text(a, b, digits)
        assert a < 10 ** digits and b < 10 ** digits


@pytest.mark.parametrize("layout", ["ckpt", "sft"])
def test_passk_samples_the_run_s_own_held_out_problems(layout, tmp_path, monkeypatch):
    """A --digits 1 --eval_size 40 run (its 100 problems allow at most 50 held out): passk.read
    samples the first problems of that run's held-out set, data.eval_problems(40, 1), not of a
    1000-problem set it may have trained on (or that 1 digit cannot hold), from ckpt.pt and from
    sft.pt alike."""
    import passk
    seen = spy_on_sample_correct(monkeypatch)
    rec = passk.read(addition_checkpoint(tmp_path / f"{layout}.pt", layout, 1, 6, 40), 2, 10, 0)
    a, b = data.eval_problems(40, 1)
    assert seen["problems"] == list(zip(a.tolist(), b.tolist()))[:10] and seen["task"].digits == 1
    assert rec["counts"] == [0] * 10
    with pytest.raises(ValueError, match="held-out set has 40"):
        passk.read(str(tmp_path / f"{layout}.pt"), 2, 41, 0)


def test_passk_of_a_checkpoint_counts_what_the_verifier_says(tmp_path, monkeypatch, capsys):
    """On a tiny run's warm start and final checkpoint: per-problem counts in [0, n], pass@k rising
    with k, pass@1 the share of correct samples, the same counts for the same seed, one JSON line
    per checkpoint; --study finds a study directory's runs and warm starts."""
    import passk
    out = tmp_path / "study" / "grpo_s0"
    assert run_main(monkeypatch, capsys, TINY + ["--sft_steps", "200", "--sft_until", "0", "--rl_steps", "1",
                                                 "--out_dir", str(out)]).returncode == 0
    (tmp_path / "study" / "warm_s0").mkdir()
    os.replace(out / "sft.pt", tmp_path / "study" / "warm_s0" / "sft.pt")
    jsonl = str(tmp_path / "passk.jsonl")
    passk.main(["--study", str(tmp_path / "study"), "--n", "4", "--problems", "20", "--jsonl", jsonl])
    recs = [json.loads(line) for line in open(jsonl)]
    assert sorted(r["arm"] for r in recs) == ["grpo", "warm"] and all(r["run_seed"] == 0 for r in recs)
    for r in recs:
        assert len(r["counts"]) == 20 and all(0 <= c <= 4 for c in r["counts"])
        means = [m for _, m, _ in r["pass_at_k"]]
        assert means == sorted(means) and means[0] == pytest.approx(sum(r["counts"]) / 80)
    again = passk.read(recs[0]["path"], 4, 20, 0)
    assert again["counts"] == recs[0]["counts"]


def test_checkpoint_readers_refuse_weights_that_do_not_fit_in_one_line(tmp_path, capsys):
    """passk.load_model, the reader of passk.py, teacher_signal.py and worked_example.py: a file
    whose weights do not fit the model_args it names, or that names none, is one ValueError line
    (passk.py: one error line and exit 1); a good one loads the weights it holds."""
    import passk
    model = tiny_gpt()
    good = {"model": model.state_dict(), "model_args": vars(model.config)}
    torch.save(good, tmp_path / "good.pt")
    loaded, _, _ = passk.load_model(str(tmp_path / "good.pt"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    for name, bad in (("wide", {**good, "model_args": {**vars(model.config), "n_embd": 64}}),
                      ("unnamed", {"model": good["model"]}), ("odd", {**good, "model_args": {"width": 3}})):
        torch.save(bad, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError) as e:
            passk.load_model(str(tmp_path / f"{name}.pt"))
        assert "\n" not in str(e.value) and "do not fit" in str(e.value)
    with pytest.raises(SystemExit) as e:
        passk.main([str(tmp_path / "wide.pt")])
    assert str(e.value).startswith("passk.py: error:") and "\n" not in str(e.value)


def test_passk_reads_the_chain_task_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """A chain run's ckpt.pt: pass@k samples the first problems of the run's own held-out chains
    (its --eval_size), never addition's; more problems than that set holds are refused."""
    import passk
    assert run_main(monkeypatch, capsys, TINY + ["--task", "chain", "--context", "derivation", "--sft_until", "0",
                                                 "--rl_steps", "1", "--out_dir", str(tmp_path)],
                    entry=extras.main).returncode == 0
    seen, sample = {}, passk.sample_correct

    def spy(model, enc, task, problems, n, max_new, seed):
        seen.update(task=task, problems=problems)
        return sample(model, enc, task, problems, n, max_new, seed)
    monkeypatch.setattr(passk, "sample_correct", spy)
    rec = passk.read(str(tmp_path / "ckpt.pt"), 3, 10, 0)
    assert isinstance(seen["task"], chain.ChainTask) and seen["task"].kind == "derivation"
    assert seen["problems"] == chain.ChainTask(40, "derivation").eval_set[:10]  # TINY's --eval_size 40
    assert len(rec["counts"]) == 10 and all(0 <= c <= 3 for c in rec["counts"])
    with pytest.raises(ValueError, match="held-out set has 40"):
        passk.read(str(tmp_path / "ckpt.pt"), 3, 41, 0)


def test_teachers_tables_by_hand(tmp_path):
    """tools/teachers.py on a made-up study of two seeds: the paired gaps, the seeds ahead, the
    model's view under ema (current_teacher_acc) and the smallest k below the warm start."""
    import teachers
    finals = {"grpo": (0.30, 0.20), "release": (0.50, 0.60), "release_ema": (0.55, 0.58), "release_beta0": (0.45, 0.50),
              "release_ema20": (0.52, 0.62)}
    with open(tmp_path / "default.jsonl", "w") as f:
        for arm, accs in finals.items():
            for seed, acc in enumerate(accs):
                ev = {"step": [0, 200], "eval_acc": [0.2, acc], "teacher_acc": [1.0, 0.9 if arm == "release_ema" else 0.8]}
                if arm == "release_ema":
                    ev["current_teacher_acc"] = [1.0, 0.7]
                rl = {"step": list(range(1, 21)), "entropy": [0.5] * 20, "kl_teacher": [0.1] * 20}
                f.write(json.dumps({"arm": arm, "seed": seed, "config": {}, "eval": ev, "rl": rl}) + "\n")
    with open(tmp_path / "passk.jsonl", "w") as f:
        for arm, curve in {"warm": [0.1, 0.3, 0.5], "grpo": [0.2, 0.3, 0.4], "release": [0.3, 0.5, 0.6]}.items():
            for seed in (0, 1):
                f.write(json.dumps({"arm": arm, "run_seed": seed, "n": 3, "problems": 10,
                                    "pass_at_k": [[k + 1, m, 0.01] for k, m in enumerate(curve)]}) + "\n")
    md = open(teachers.main(str(tmp_path))).read()
    runs = teachers.load(str(tmp_path / "default.jsonl"))
    assert teachers.views(runs["release_ema"][0]) == ([0, 200], [1.0, 0.9], [1.0, 0.7])  # EMA's, model's
    assert teachers.views(runs["release"][1]) == ([0, 200], [1.0, 0.8], [1.0, 0.8])  # one under current
    ema = next(line for line in md.splitlines() if line.startswith("| release_ema |"))
    assert "| +0.015 ± 0.049 (1/2) |" in ema  # - release: +0.05 and -0.02
    assert "| +0.090 ± 0.014 (2/2) |" in ema  # - release_beta0: +0.10, +0.08
    assert "| 0.900 ± 0.000 | 0.700 ± 0.000 (0.700 ± 0.000) |" in ema  # the EMA's view, the model's
    grpo_row = next(line for line in md.splitlines() if line.startswith("| grpo | 2 |"))
    assert grpo_row.endswith("| 3 |")  # 0.4 < 0.5 at k = 3, not before
    release_row = next(line for line in md.splitlines() if line.startswith("| release | 2 |"))
    assert "| +0.200 (2/2) | +0.100 (2/2) | +0.200 (2/2) | never |" in release_row
    rate = next(line for line in md.splitlines() if line.startswith("| 0.2 |"))  # the EMA rate table
    assert rate == "| 0.2 | 2 | 0.570 ± 0.071 | +0.020 ± 0.000 (2/2) | +0.005 ± 0.049 (1/2) | 0.800 ± 0.000 | 0.800 ± 0.000 |"
    assert next(line for line in md.splitlines() if line.startswith("| 0.05 |")).split(" | ")[4] == "-"


# -----------------------------------------------------------------------------
# tools/exactness.py: each approximation's gradient beside the exact one

def test_approx_gradients_against_the_loss_s_own_term_and_top_k_at_k_v(monkeypatch):
    """On a fixed float64 mini-batch: the exact gradient is the gradient of minibatch_loss's own
    distillation term (ungated) over beta; at k = V every top-k form is the exact term (cosine 1,
    norm 1, bias 0, nothing left out); at k = 1 the renormalised forms have one entry and no
    gradient (cosine 0 by definition, norm 0, value 0: bias -KL); the sampled token's k1 bias is
    the mean of log p(y) - log q(y) - KL, computed here from the full logits."""
    import exactness
    V = ENC.n_vocab
    monkeypatch.setattr(exactness, "KS", (1, V))
    monkeypatch.setattr(exactness, "DRAWS", 2)
    model = tiny_gpt(torch.float64)
    teacher = tiny_gpt(torch.float64, seed=5)
    mb = double(fixed_rollouts(model, 4, seed=12))
    mb.h_teacher = sdpg.response_hidden(teacher, mb.cx, mb.resp).detach()
    mb.w_teacher = teacher.lm_head_weight.detach()
    args = parse("--opd_gate", "all", "--alpha", "0", "--temperature", "0.8")
    args.group_size = 1
    out = exactness.approx_gradients(make_run(model, args), 1, mb)
    n = mb.mask.sum().item()
    _, sums, terms = sdpg.minibatch_loss(model, model.lm_head_weight, mb, n, args, 0.3, 1)
    assert out["kl_exact"] == pytest.approx((sums["kl_teacher"] / n).item(), rel=1e-10)
    for kind in ("student", "tail", "teacher"):
        assert out[f"cos_{kind}_{V}"] == pytest.approx(1, abs=1e-9)
        assert out[f"norm_{kind}_{V}"] == pytest.approx(1, abs=1e-9)
        assert out[f"bias_{kind}_{V}"] == pytest.approx(0, abs=1e-12)
    assert out[f"mass_{V}"] == pytest.approx(0, abs=1e-12) and out[f"mass_teacher_{V}"] == pytest.approx(0, abs=1e-12)
    for kind in ("student", "teacher"):
        assert out[f"cos_{kind}_1"] == 0 and out[f"norm_{kind}_1"] == 0
        assert out[f"bias_{kind}_1"] == pytest.approx(-out["kl_exact"], rel=1e-10)
    m = mb.mask > 0
    zs = response_logits(model, mb.x, mb.resp)[m] / 0.8
    zt = (mb.h_teacher @ mb.w_teacher.T)[m] / 0.8
    logp, logq = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    y = mb.resp[m]
    k1 = (logp.gather(-1, y[:, None]) - logq.gather(-1, y[:, None]))[:, 0]
    assert out["bias_sampled"] == pytest.approx((k1.sum() / n).item() - out["kl_exact"], rel=1e-8)
    # the term the hook differentiates (the raw logits, tau 0.8) is minibatch_loss's distillation
    # term over its weight beta, gradient and all
    params = list(model.parameters())
    g_loss = torch.cat([x.flatten() for x in torch.autograd.grad(terms["opd"] / 0.3, params)])
    hook_term = exactness.approx.exact_reverse_kl(zs * 0.8, zt * 0.8, 0.8).sum() / n
    assert_close(torch.cat([x.flatten() for x in torch.autograd.grad(hook_term, params)]), g_loss)


def test_the_gradient_study_hook_changes_nothing_the_run_computes(tmp_path, monkeypatch):
    """tools/extras.py --approx_every 1 logs the study's fields at every step and leaves every
    record of the run (warm start, RL steps, evaluations) as the same run without it."""
    flags = TINY + ["--sft_until", "0", "--rl_steps", "2", "--recipe", "release"]
    runs = {}
    for name, extra in (("plain", []), ("study", ["--approx_every", "1"])):
        run_in_process(monkeypatch, flags + extra + ["--out_dir", str(tmp_path / name)], entry=extras.main)
        with open(tmp_path / name / "log.jsonl") as f:
            runs[name] = [json.loads(line) for line in f]
    plain, study = runs["plain"], runs["study"]
    assert len(plain) == len(study)
    for a, b in zip(plain, study):
        shared = {k: v for k, v in b.items() if k in a and k not in ("dt", "tok_per_s", "dt_hook", "out_dir", "time")}
        assert shared == {k: v for k, v in a.items() if k not in ("dt", "tok_per_s", "dt_hook", "out_dir", "time")}
    rl = [r for r in study if r["phase"] == "rl"]
    assert len(rl) == 2 and all(-1 <= r["cos_tail_16"] <= 1 and r["var_sampled"] >= 0 for r in rl)


@pytest.mark.parametrize("spec", ["tail_4", "student_2", "teacher_8", "sampled", "exact"])
def test_kl_approx_puts_the_approximation_in_the_loss(spec, monkeypatch):
    """extras.py --kl_approx: minibatch_loss's distillation term becomes beta times the token-mean
    of the approximation's per-token value on the full logits of both views (the sampled token at
    the scored tokens), value and gradient, against tools/approx.py's function on logits formed
    here in float64; `exact` equals sdpg.py's own fused term."""
    monkeypatch.setattr(sdpg, "minibatch_loss", sdpg.minibatch_loss)  # restored after the test
    monkeypatch.setattr(sdpg, "fused_reverse_kl", sdpg.fused_reverse_kl)
    model, teacher = tiny_gpt(torch.float64), tiny_gpt(torch.float64, seed=5)
    mb = double(fixed_rollouts(model, 4, seed=12))
    mb.h_teacher = sdpg.response_hidden(teacher, mb.cx, mb.resp).detach()
    mb.w_teacher = teacher.lm_head_weight.detach()
    args = parse("--opd_gate", "all", "--alpha", "0", "--temperature", "0.8", "--kl_cap", "0")
    n = mb.mask.sum().item()
    _, _, fused = sdpg.minibatch_loss(model, model.lm_head_weight, mb, n, args, 0.3, 1)
    extras.use_kl_approximation(spec)
    _, _, terms = sdpg.minibatch_loss(model, model.lm_head_weight, mb, n, args, 0.3, 1)
    zs = response_logits(model, mb.x, mb.resp).flatten(0, 1)
    zt = (mb.h_teacher @ mb.w_teacher.T).flatten(0, 1)
    name, _, k = spec.partition("_")
    if name == "sampled":
        value = extras.approx.sampled_token(zs, zt, mb.resp.flatten(), 0.8)
    elif name == "exact":
        value = extras.approx.exact_reverse_kl(zs, zt, 0.8)
    else:
        form = {"student": extras.approx.topk_student_renorm, "tail": extras.approx.topk_student_tail,
                "teacher": extras.approx.topk_teacher_renorm}[name]
        value = form(zs, zt, int(k), 0.8)
    expected = 0.3 * (value * mb.mask.flatten()).sum() / n
    params = list(model.parameters())
    assert_close(terms["opd"], expected)
    for g, g_ref in zip(torch.autograd.grad(terms["opd"], params, retain_graph=True),
                        torch.autograd.grad(expected, params)):
        assert_close(g, g_ref)
    if name == "exact":
        assert_close(terms["opd"], fused["opd"], rtol=1e-10, atol=1e-12)


def test_kl_approx_trains_end_to_end_and_refuses_a_bad_name_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sdpg, "minibatch_loss", sdpg.minibatch_loss)
    monkeypatch.setattr(sdpg, "fused_reverse_kl", sdpg.fused_reverse_kl)
    out = str(tmp_path / "run")
    flags = TINY + ["--sft_until", "0", "--rl_steps", "1", "--recipe", "release", "--out_dir", out]
    run_in_process(monkeypatch, flags + ["--kl_approx", "tail_4"], entry=extras.main)
    with open(os.path.join(out, "log.jsonl")) as f:
        rl = [r for r in map(json.loads, f) if r["phase"] == "rl"]
    assert len(rl) == 1 and math.isfinite(rl[0]["loss"]) and rl[0]["kl_teacher"] >= 0
    for bad in ("top_4", "tail_0", "tail", "sampled_3"):
        p = run_main(monkeypatch, capsys, flags + ["--kl_approx", bad], entry=extras.main)
        assert one_line_error(p, "--kl_approx"), (bad, p.stderr)
