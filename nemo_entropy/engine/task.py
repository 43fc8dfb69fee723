"""The verifiable task of the local engine: multi-digit addition with an exact-match reward.

Problems are generated in code from a seed, so a run needs no data set and every rank (and every resume)
regenerates exactly the same prompts. The vocabulary is the task's characters; a prompt is
``BOS a + b =`` with both operands zero-padded to ``digits`` characters (all prompts have the same length,
so the causal LM needs no attention mask), and the answer is the sum without leading zeros, then ``EOS``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

PAD, BOS, EOS, PLUS, EQUALS = 0, 1, 2, 3, 4
DIGIT0 = 5
SPECIAL_TOKENS = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "+": PLUS, "=": EQUALS}
VOCAB_SIZE = DIGIT0 + 10

SUPPORTED_TASKS = ("addition",)


def stream_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` by hashing (independent streams for every (seed, step, index))."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def encode_digits(number: int, width: int | None = None) -> list[int]:
    """Token ids of ``number`` in decimal, zero-padded to ``width`` characters when given."""
    text = str(number) if width is None else str(number).zfill(width)
    return [DIGIT0 + int(ch) for ch in text]


def decode(tokens: list[int]) -> str:
    """Readable text of token ids (for logs and examples)."""
    names = {v: k for k, v in SPECIAL_TOKENS.items()}
    return "".join(str(t - DIGIT0) if t >= DIGIT0 else names.get(t, "?") for t in tokens)


@dataclass(frozen=True)
class AdditionTask:
    """``a + b`` with ``0 <= a, b < 10**digits``.

    Attributes:
        digits: operand width; the answer has at most ``digits + 1`` digits.
    """

    digits: int = 3

    def __post_init__(self):
        if not 1 <= self.digits <= 6:
            raise ValueError(f"engine.task.digits must be in [1, 6], got {self.digits}")

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def prompt_length(self) -> int:
        return 1 + 2 * self.digits + 2

    @property
    def max_response_length(self) -> int:
        """Answer digits plus EOS."""
        return self.digits + 2

    def sample_operands(self, count: int, seed: int) -> torch.Tensor:
        """``count`` operand pairs [count, 2] drawn from a generator seeded by ``seed`` alone."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, 10**self.digits, (count, 2), generator=gen)

    def prompts(self, operands: torch.Tensor) -> torch.Tensor:
        """Prompt token ids [count, prompt_length]."""
        rows = []
        for a, b in operands.tolist():
            rows.append([BOS] + encode_digits(a, self.digits) + [PLUS] + encode_digits(b, self.digits) + [EQUALS])
        return torch.tensor(rows, dtype=torch.long)

    def answers(self, operands: torch.Tensor) -> torch.Tensor:
        """Reference responses [count, max_response_length]: the sum, EOS, then PAD."""
        out = torch.full((operands.shape[0], self.max_response_length), PAD, dtype=torch.long)
        for i, (a, b) in enumerate(operands.tolist()):
            ids = encode_digits(a + b) + [EOS]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def rewards(self, operands: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """Exact-match reward in {0, 1}: the response up to and including its first EOS equals the answer."""
        reference = self.answers(operands)
        # Everything after the first EOS is padding the policy never "said": compare only up to it.
        valid = response_mask(responses)
        ref_valid = response_mask(reference)
        same = ((responses == reference) | ~valid) & (valid == ref_valid)
        return same.all(dim=1).to(torch.float32)


def response_mask(responses: torch.Tensor) -> torch.Tensor:
    """Valid response tokens: everything up to and including the first EOS (all tokens if none)."""
    is_eos = responses == EOS
    # Number of EOS strictly before each position; a token is valid while none has been emitted yet.
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return before == 0


def build_task(task_cfg) -> AdditionTask:
    """The task named by ``engine.task`` (a mapping with ``name`` and its parameters)."""
    name = task_cfg.get("name", "addition")
    if name not in SUPPORTED_TASKS:
        raise ValueError(f"engine.task.name must be one of {SUPPORTED_TASKS}, got {name!r}")
    return AdditionTask(digits=int(task_cfg.get("digits", 3)))
