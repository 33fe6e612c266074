"""
The task, the tokenizer and the verifier.

Task: add two d-digit numbers (d = 2 by default, --digits) and write the (d+1)-digit sum
reversed, least significant digit first. Reversal lets a left-to-right model produce each digit after the carry
that decides it, the usual trick that makes addition learnable by a small GPT.

Worked example with --digits 3, a = 7, b = 596 (sum 603):

    student prompt  x = "007+596="                  8 tokens, one per character
    response        y = "3060" <|endoftext|>        5 tokens: 0603 reversed, then end-of-text
    privileged      c = <|hint|>3060<|hint|>        6 tokens: the correct answer, marked
    teacher prompt      c + x                       14 tokens

With the default d = 2, 7 + 96 gives x = "07+96=", y = "301" <|endoftext|>, c = <|hint|>301<|hint|>.
The student view sees x and never c; the teacher view sees c + x. Both views read the
same response tokens y, the teacher's positions shifted right by len(c) = d + 3.

Every character is encoded as one token (encode_chars), so under any encoding every
prompt of the task has the same length and a batch of prompts needs no padding.
Sampled responses may still contain any token of the vocabulary; they are judged as
decoded text.
"""
import numpy as np
import tiktoken

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


def get_encoding(name=None):
    """name=None: byte_encoding(). Otherwise tiktoken's named encoding (gpt2, cl100k_base, ...),
    extended with the task's special tokens; raises ValueError with one readable line when the
    encoding's files cannot be loaded (tiktoken downloads them on first use)."""
    if name is None or name == "bytes":
        return byte_encoding()
    try:
        base = tiktoken.get_encoding(name)
    except Exception as e:  # unknown name, or no network to fetch the BPE file
        raise ValueError(f"tokenizer {name!r} is not available here ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'}); "
                         f"the default byte-level tokenizer needs no files") from None
    special = dict(base._special_tokens)
    special.setdefault(EOT, base.n_vocab)
    special[HINT] = max(base.n_vocab, max(special.values()) + 1)
    return tiktoken.Encoding(name=f"{name}_sdpg", pat_str=base._pat_str,
                             mergeable_ranks=base._mergeable_ranks, special_tokens=special)


def encode_chars(enc, text):
    """One token per character: str -> list[int]. Every ASCII character is a single token in
    byte-level, gpt2 and cl100k_base encodings alike."""
    return [enc.encode_single_token(ch) for ch in text]


def decode_response(enc, tokens):
    """Response tokens -> text, cut at the first end-of-text. Never raises: invalid UTF-8 becomes
    U+FFFD and ids outside the encoding are dropped."""
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
# problems

EVAL_SEED = 1234            # the held-out set is the same for every run and every --seed


def answer_text(a, b, digits=NUM_DIGITS):
    """The sum zero-padded to digits + 1 digits, reversed: 7 + 596 -> '3060' (digits = 3)."""
    return str(a + b).zfill(digits + 1)[::-1]


def prompt_text(a, b, digits=NUM_DIGITS):
    """The student prompt x: 7, 596 -> '007+596=' (digits = 3)."""
    return f"{a:0{digits}d}+{b:0{digits}d}="


def eval_problems(n, digits=NUM_DIGITS):
    """The fixed held-out set: n distinct (a, b) pairs drawn with EVAL_SEED, as two int arrays."""
    rng = np.random.default_rng(EVAL_SEED)
    keys = rng.choice(10 ** (2 * digits), size=n, replace=False)
    return keys // 10 ** digits, keys % 10 ** digits


def sample_problems(rng, n, held_out_keys, digits=NUM_DIGITS):
    """n training pairs (a, b) from a numpy Generator, never one of the held-out pairs
    (held_out_keys = a * 10**digits + b of the eval set, a sorted int array)."""
    hi = 10 ** digits
    a, b = rng.integers(0, hi, n), rng.integers(0, hi, n)
    clash = np.isin(a * hi + b, held_out_keys)
    while clash.any():  # redraw the few that hit the eval set
        a[clash], b[clash] = rng.integers(0, hi, clash.sum()), rng.integers(0, hi, clash.sum())
        clash = np.isin(a * hi + b, held_out_keys)
    return a, b


def encode_problems(enc, a, b, digits=NUM_DIGITS):
    """Token arrays for a batch of problems, as lists of lists:
    student prompts x, teacher prompts c + x, target responses y (answer + end-of-text),
    and the answers as strings for the verifier."""
    hint = enc.encode_single_token(HINT)
    answers = [answer_text(int(i), int(j), digits) for i, j in zip(a, b)]
    student = [encode_chars(enc, prompt_text(int(i), int(j), digits)) for i, j in zip(a, b)]
    context = [[hint] + encode_chars(enc, ans) + [hint] for ans in answers]
    teacher = [c + x for c, x in zip(context, student)]
    targets = [encode_chars(enc, ans) + [enc.eot_token] for ans in answers]
    return student, teacher, targets, answers


# -----------------------------------------------------------------------------
# verifier

def reward(response_text, answer):
    """1.0 when the response is exactly the answer, else 0.0. Never raises."""
    return 1.0 if isinstance(response_text, str) and response_text == answer else 0.0
