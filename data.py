"""
The task, the tokenizer and the verifier.

Task: add two d-digit numbers (d = 2 by default, --digits) and write the (d+1)-digit sum
reversed, least significant digit first. Reversal lets a left-to-right model produce each
digit after the carry that decides it, the usual trick that makes addition learnable by a
small GPT.

Worked example with --digits 3, a = 7, b = 596 (sum 603):

    student prompt  x = "007+596="              8 tokens, one per character
    response        y = "3060" <|endoftext|>    5 tokens: 0603 reversed, then end-of-text
    privileged      c = <|hint|>3060<|hint|>    6 tokens: the correct answer, marked
    teacher prompt      c + x                   14 tokens

With the default d = 2, 7 + 96 gives x = "07+96=", y = "301" <|endoftext|> and
c = <|hint|>301<|hint|>. The student view sees x and never c; the teacher view sees c + x.
Both views read the same response tokens y, the teacher's positions shifted right by
len(c) = d + 3. Other contexts (the carries, a partial, noisy or unrelated answer) are a
study's: tools/extras.py.

Every byte of the text is one token (encode_chars). ASCII has one byte a character, so
every prompt of this task has the same length under any encoding; other text is taken byte
by byte. A task whose prompts differ in length is padded on the left in RL and evaluation
(left_pad: the model masks the padding and counts positions from a row's first token) and
on the right in the warm start. Sampled responses may contain any token of the vocabulary;
they are judged as decoded text.
"""
import numpy as np
import tiktoken
import torch

NUM_DIGITS = 2              # default operand digits (--digits); answers have one digit more
EOT = "<|endoftext|>"       # ends every response
HINT = "<|hint|>"           # marks the privileged context; only the teacher view holds it


# -----------------------------------------------------------------------------
# tokenizer

def byte_encoding():
    """A byte-level tiktoken Encoding built in code (nothing to download): 256 byte tokens,
    no merges, so every digit is one token, plus the two special tokens (ids 256 and 257)."""
    return tiktoken.Encoding(
        name="sdpg_bytes",
        pat_str=r"\d|[^\d]+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT: 256, HINT: 257},
    )


def get_encoding():
    """The task's tokenizer: byte_encoding(), one token per byte, nothing to download."""
    return byte_encoding()


def encode_chars(enc, text):
    """One token per UTF-8 byte of the text: str -> list[int]. An ASCII character is one
    byte, so one token; "é" is two. Every single byte is a token of byte-level, gpt2 and
    cl100k_base encodings alike, and decode_response joins the bytes back into the text. A
    task's text never becomes a special token: "<|hint|>" in a prompt is eight byte tokens,
    not the marker."""
    return [enc.encode_single_token(bytes([b])) for b in text.encode("utf-8")]


def decode_response(enc, tokens):
    """Response tokens -> text, cut at the first end-of-text. Never raises: invalid UTF-8
    becomes U+FFFD and ids outside the encoding are dropped."""
    eot = enc.eot_token
    out = []
    for t in tokens:
        t = int(t)
        if t == eot:
            break
        if 0 <= t < enc.n_vocab:
            out.append(t)
    try:
        return enc.decode(out)
    except Exception:  # a padded vocabulary id with no bytes behind it
        return ""


# -----------------------------------------------------------------------------
# the task interface: what sdpg.py asks of a task

class AdditionTask:
    """d-digit addition, the task sdpg.py trains on. A task of your own needs the same seven
    members:

        eval_set          the fixed held-out problems (a list; any objects a task likes)
        sample(rng, n)    n training problems from a numpy Generator, none of them held out
        prompt(p)         the student prompt x, as text
        context(p, rng)   the privileged context c, as text (only the teacher view sees it);
                          rng, a numpy Generator, for contexts drawn at random
        answer(p)         the reference response y*, as text (the warm start imitates it)
        reward(text, p)   the verifier: the decoded response -> a float, never raising
        __repr__()        names the task's settings: it keys the warm-start cache (sdpg.sft_key)
                          and a resume must name the same task

    encode_batch() below turns problems into tokens, one per byte of text; prompts, contexts
    and answers may differ in length from problem to problem. The model's block size is the
    longest teacher prompt of the held-out set plus --max_new_tokens (which must hold its
    longest answer and the end-of-text): training problems may not be longer.
    """

    def __init__(self, digits=NUM_DIGITS, eval_size=1000):
        if not 1 <= digits <= 6:
            raise ValueError(f"--digits must be in [1, 6] (got {digits})")
        n_problems = 10 ** (2 * digits)
        most = min(100_000, n_problems // 2)
        if not 1 <= eval_size <= most:
            raise ValueError(f"--eval_size must be in [1, {most}]: at least half of the "
                             f"{n_problems} problems stay for training")
        self.digits = digits
        a, b = eval_problems(eval_size, digits)
        self.eval_set = list(zip(a.tolist(), b.tolist()))
        # keys a * 10**d + b of the held-out problems, never drawn to train
        self.held_out = np.sort(a * 10 ** digits + b)

    def __repr__(self):  # names the settings: it keys the warm-start cache (sdpg.sft_key)
        return f"AdditionTask(digits={self.digits}, eval_size={len(self.eval_set)})"

    def sample(self, rng, n):
        a, b = sample_problems(rng, n, self.held_out, self.digits)
        return list(zip(a.tolist(), b.tolist()))

    def prompt(self, p):
        return prompt_text(*p, self.digits)

    def context(self, p, rng):
        return answer_text(*p, self.digits)  # the answer itself; rng is unused

    def answer(self, p):
        return answer_text(*p, self.digits)

    def reward(self, text, p):
        return reward(text, self.answer(p))


def verify(enc, task, resp, problems, group_size=1):
    """The verifier's reward of each response row (token ids, a tensor or an array); rows
    b*G .. b*G+G-1 answer problems[b]."""
    rewards = []
    for i, row in enumerate(resp.tolist()):
        text = decode_response(enc, row)
        rewards.append(task.reward(text, problems[i // group_size]))
    return rewards


def sft_batch(enc, task, rng, n, hint_frac):
    """A warm-start batch of n problems, a fraction hint_frac shown with c: token lists of
    inputs and of targets, both of one length L, targets -1 except on the response. Rows are
    padded on the right to the longest teacher prompt plus the longest target (causal
    attention never lets padding reach the response, and every row's positions start at its
    first token)."""
    problems = task.sample(rng, n)
    student, teacher, targets = encode_batch(enc, task, problems, rng)
    hinted = rng.random(n) < hint_frac
    L = max(map(len, teacher)) + max(map(len, targets)) - 1
    inputs, labels = [], []
    for i in range(n):
        prompt = teacher[i] if hinted[i] else student[i]
        seq = prompt + targets[i][:-1]
        lab = [-1] * (len(prompt) - 1) + targets[i]  # the position before each target predicts it
        inputs.append(seq + [enc.eot_token] * (L - len(seq)))
        labels.append(lab + [-1] * (L - len(lab)))
    return inputs, labels


def left_pad(rows, pad_id, device):
    """Token lists of any lengths -> (B, L) padded on the left with pad_id, and each row's
    padding (B,), or None when every row has one length (then the model takes its unmasked
    path)."""
    L = max(map(len, rows))
    n_pad = [L - len(r) for r in rows]
    padded = [[pad_id] * p + r for p, r in zip(n_pad, rows)]
    x = torch.tensor(padded, device=device)  # (B, L)
    if not any(n_pad):
        return x, None
    return x, torch.tensor(n_pad, device=device)


def encode_batch(enc, task, problems, rng):
    """Token lists for a batch of problems, one token per byte (encode_chars): student
    prompts x, teacher prompts c + x with c marked as <|hint|> c <|hint|>, and the target
    responses y* + <|endoftext|> (warm start). rng (a numpy Generator) draws the contexts
    that involve chance, one per problem, in order. Lengths may differ between problems."""
    hint = enc.encode_single_token(HINT)
    eot = enc.eot_token
    student = [encode_chars(enc, task.prompt(p)) for p in problems]
    teacher = []
    for p, x in zip(problems, student):
        c = encode_chars(enc, task.context(p, rng))
        teacher.append([hint] + c + [hint] + x)
    targets = [encode_chars(enc, task.answer(p)) + [eot] for p in problems]
    return student, teacher, targets


# -----------------------------------------------------------------------------
# addition problems

EVAL_SEED = 1234            # the held-out set is the same for every run and every --seed


def answer_text(a, b, digits=NUM_DIGITS):
    """The sum zero-padded to digits + 1 digits, reversed: 7 + 596 -> '3060' (digits = 3)."""
    return str(a + b).zfill(digits + 1)[::-1]


def prompt_text(a, b, digits=NUM_DIGITS):
    """The student prompt x: 7, 596 -> '007+596=' (digits = 3)."""
    return f"{a:0{digits}d}+{b:0{digits}d}="


def eval_problems(n, digits=NUM_DIGITS):
    """The fixed held-out set: n distinct (a, b) pairs drawn with EVAL_SEED, as two int
    arrays."""
    rng = np.random.default_rng(EVAL_SEED)
    keys = rng.choice(10 ** (2 * digits), size=n, replace=False)  # key = a * 10**d + b
    a = keys // 10 ** digits
    b = keys % 10 ** digits
    return a, b


def sample_problems(rng, n, held_out_keys, digits=NUM_DIGITS):
    """n training pairs (a, b) from a numpy Generator, never one of the held-out pairs
    (held_out_keys = a * 10**digits + b of the eval set, a sorted int array)."""
    hi = 10 ** digits
    a = rng.integers(0, hi, n)
    b = rng.integers(0, hi, n)
    clash = np.isin(a * hi + b, held_out_keys)
    while clash.any():  # redraw the few that hit the eval set
        k = clash.sum()
        a[clash] = rng.integers(0, hi, k)
        b[clash] = rng.integers(0, hi, k)
        clash = np.isin(a * hi + b, held_out_keys)
    return a, b


# -----------------------------------------------------------------------------
# verifier

def reward(response_text, answer):
    """1.0 when the response is exactly the answer, else 0.0. Never raises."""
    if isinstance(response_text, str) and response_text == answer:
        return 1.0
    return 0.0
