"""The verifiable tasks of the local engine: a Countdown-style target game and multi-digit addition.

Problems are generated in code from a seed, so a run needs no data set and every rank (and every resume)
regenerates exactly the same prompts. The vocabulary is the task's characters, and every prompt of a task has
the same length (numbers zero-padded), so the causal LM needs no attention mask.

* ``addition``: the prompt is ``BOS a + b =`` with both operands zero-padded to ``digits`` characters, the
  answer is the sum without leading zeros, then ``EOS``; exact-match reward.
* ``countdown``: the prompt is ``BOS n1,n2,...,nk:T=`` (given numbers and a target); the response is a
  scratchpad of steps ``x op y = z`` separated by ``,`` and ended by ``EOS``. A step combines two numbers of
  the pool (the given numbers, then the results of earlier steps; each used at most once) with ``+``, ``-``
  or ``*``; the reward is 1 when every step is well formed, uses available numbers, computes ``z`` exactly
  (``0 <= z <= max_value``) and the last result equals the target. Many responses are correct for one
  problem (different pairs, orders and operations); the warm start sees only one of them (the canonical
  shortest solution, :meth:`CountdownTask.solve`).
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass
from typing import Optional, Union

import torch

PAD, BOS, EOS, PLUS, EQUALS = 0, 1, 2, 3, 4
DIGIT0 = 5
SPECIAL_TOKENS = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "+": PLUS, "=": EQUALS}
VOCAB_SIZE = DIGIT0 + 10
# Tokens of the countdown task only (the addition task keeps its 15-token vocabulary).
MINUS, TIMES, COMMA, COLON = VOCAB_SIZE, VOCAB_SIZE + 1, VOCAB_SIZE + 2, VOCAB_SIZE + 3
COUNTDOWN_TOKENS = {"-": MINUS, "*": TIMES, ",": COMMA, ":": COLON}
COUNTDOWN_VOCAB_SIZE = VOCAB_SIZE + 4
OP_TOKENS = {"+": PLUS, "-": MINUS, "*": TIMES}

SUPPORTED_TASKS = ("countdown", "addition")
# engine.task keys of each task (besides ``name``), with their defaults.
TASK_KEYS = {
    "addition": {"digits": 2},
    "countdown": {"numbers": 4, "max_number": 9, "max_value": 99, "min_target": 10, "ops": "+-*"},
}


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
    names = {v: k for k, v in {**SPECIAL_TOKENS, **COUNTDOWN_TOKENS}.items()}
    return "".join(str(t - DIGIT0) if DIGIT0 <= t < DIGIT0 + 10 else names.get(t, "?") for t in tokens)


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


def _apply(op: str, x: int, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


@dataclass(frozen=True)
class CountdownTask:
    """Reach ``target`` from ``numbers`` given numbers with ``+``, ``-``, ``*``, writing every step out.

    Attributes:
        numbers: how many numbers a problem gives (2..6).
        max_number: the given numbers are drawn uniformly from ``[1, max_number]`` (1..99).
        max_value: every intermediate result and the target lie in ``[0, max_value]`` (``max_number``..999);
            a step whose result leaves that range is invalid (responses stay short).
        min_target: targets are drawn in ``[min_target, max_value]`` and never equal a given number.
        ops: the allowed operations, a string of distinct characters from ``+-*``.

    A problem is solvable by construction: the target is the value of a random expression over all the
    given numbers (a random sequence of merges of two pool numbers) whose intermediate results stay in range.
    """

    numbers: int = 4
    max_number: int = 9
    max_value: int = 99
    min_target: int = 10
    ops: str = "+-*"

    def __post_init__(self):
        checks = [
            ("numbers", self.numbers, 2, 6),
            ("max_number", self.max_number, 1, 99),
            ("max_value", self.max_value, max(2, self.max_number), 999),
            ("min_target", self.min_target, 0, self.max_value),
        ]
        for key, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"engine.task.{key}={value!r} is invalid: expected an integer in [{low}, {high}]")
        if not isinstance(self.ops, str) or not self.ops or len(set(self.ops)) != len(self.ops) or set(self.ops) - set("+-*"):
            raise ValueError(f"engine.task.ops={self.ops!r} is invalid: expected distinct characters from '+-*'")

    # ------------------------------------------------------------------ shapes
    @property
    def vocab_size(self) -> int:
        return COUNTDOWN_VOCAB_SIZE

    @property
    def number_width(self) -> int:
        return len(str(self.max_number))

    @property
    def value_width(self) -> int:
        return len(str(self.max_value))

    @property
    def prompt_length(self) -> int:
        """``BOS``, the numbers (zero-padded) with ``,`` between them, ``:``, the target (zero-padded), ``=``."""
        return 1 + self.numbers * (self.number_width + 1) + self.value_width + 1

    @property
    def max_response_length(self) -> int:
        """``numbers - 1`` steps of at most ``3 * value_width + 3`` tokens (the last one's ``,`` is ``EOS``)."""
        return (self.numbers - 1) * (3 * self.value_width + 3)

    # ------------------------------------------------------------------ problems
    def _problem(self, rng: random.Random) -> tuple[int, ...]:
        while True:
            given = [rng.randint(1, self.max_number) for _ in range(self.numbers)]
            pool = list(given)
            while len(pool) > 1:
                i, j = rng.sample(range(len(pool)), 2)
                x, y = max(pool[i], pool[j]), min(pool[i], pool[j])
                results = [_apply(op, x, y) for op in self.ops]
                results = [z for z in results if 0 <= z <= self.max_value]
                if not results:
                    break
                pool = [v for k, v in enumerate(pool) if k not in (i, j)] + [rng.choice(results)]
            if len(pool) == 1 and self.min_target <= pool[0] <= self.max_value and pool[0] not in given:
                return (*given, pool[0])

    def sample_operands(self, count: int, seed: int) -> torch.Tensor:
        """``count`` problems [count, numbers + 1] (the given numbers, then the target), from ``seed`` alone."""
        rng = random.Random(seed)
        return torch.tensor([self._problem(rng) for _ in range(count)], dtype=torch.long).view(count, self.numbers + 1)

    def prompts(self, operands: torch.Tensor) -> torch.Tensor:
        """Prompt token ids [count, prompt_length]."""
        rows = []
        for problem in operands.tolist():
            row = [BOS]
            for k, n in enumerate(problem[:-1]):
                row += ([COMMA] if k else []) + encode_digits(n, self.number_width)
            rows.append(row + [COLON] + encode_digits(problem[-1], self.value_width) + [EQUALS])
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.prompt_length)

    # ------------------------------------------------------------------ solutions
    def solve(self, numbers: tuple[int, ...], target: int) -> Optional[list[tuple[int, str, int, int]]]:
        """The canonical solution: the shortest, then first in a fixed search order; ``None`` if unsolvable.

        Steps are ``(x, op, y, z)``. The search merges pool pairs ``(i, j)``, ``i < j`` in pool order
        (results are appended), operations in the order of ``ops``, larger operand first.
        """
        return _canonical_solution(tuple(numbers), target, self.ops, self.max_value)

    def format_steps(self, steps: list[tuple[int, str, int, int]]) -> list[int]:
        """Token ids of a scratchpad (steps separated by ``,``, then ``EOS``)."""
        ids: list[int] = []
        for k, (x, op, y, z) in enumerate(steps):
            ids += ([COMMA] if k else []) + encode_digits(x) + [OP_TOKENS[op]] + encode_digits(y) + [EQUALS] + encode_digits(z)
        return ids + [EOS]

    def answers(self, operands: torch.Tensor) -> torch.Tensor:
        """Reference responses [count, max_response_length]: the canonical solution, EOS, then PAD."""
        out = torch.full((operands.shape[0], self.max_response_length), PAD, dtype=torch.long)
        for i, problem in enumerate(operands.tolist()):
            steps = self.solve(tuple(problem[:-1]), problem[-1])
            if steps is None:  # pragma: no cover - generated problems are solvable by construction
                raise ValueError(f"countdown problem {problem} has no solution")
            ids = self.format_steps(steps)
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    # ------------------------------------------------------------------ the verifier
    def parse(self, tokens: list[int]) -> Optional[list[tuple[int, str, int, int]]]:
        """The steps of a response (up to its first EOS), or ``None`` if it is not well formed.

        Well formed: at least one step, each ``number op number = number`` with decimal numbers of at most
        ``value_width`` digits and no leading zero, steps separated by ``,``, ended by ``EOS``.
        """
        if EOS not in tokens:
            return None
        body = tokens[: tokens.index(EOS)]
        steps = []
        chunk: list[int] = []
        for tok in body + [COMMA]:
            if tok != COMMA:
                chunk.append(tok)
                continue
            step = self._parse_step(chunk)
            if step is None:
                return None
            steps.append(step)
            chunk = []
        return steps

    def _parse_step(self, chunk: list[int]) -> Optional[tuple[int, str, int, int]]:
        ops = {v: k for k, v in OP_TOKENS.items()}
        parts: list[list[int]] = [[]]
        symbols: list[int] = []
        for tok in chunk:
            if DIGIT0 <= tok < DIGIT0 + 10:
                parts[-1].append(tok - DIGIT0)
            elif tok in ops or tok == EQUALS:
                symbols.append(tok)
                parts.append([])
            else:
                return None
        if len(parts) != 3 or len(symbols) != 2 or symbols[0] not in ops or symbols[1] != EQUALS:
            return None
        values = []
        for digits in parts:
            if not digits or len(digits) > self.value_width or (digits[0] == 0 and len(digits) > 1):
                return None
            values.append(int("".join(map(str, digits))))
        return values[0], ops[symbols[0]], values[1], values[2]

    def check(self, numbers: tuple[int, ...], target: int, steps: Optional[list[tuple[int, str, int, int]]]) -> bool:
        """Whether ``steps`` solve the problem (the rules in the class docstring)."""
        if not steps:
            return False
        pool = list(numbers)
        for x, op, y, z in steps:
            if op not in self.ops or z != _apply(op, x, y) or not 0 <= z <= self.max_value:
                return False
            for v in (x, y):
                if v not in pool:
                    return False
                pool.remove(v)
            pool.append(z)
        return steps[-1][3] == target

    def rewards(self, operands: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """Verifier reward in {0, 1} per response (see :meth:`check`)."""
        out = torch.zeros(responses.shape[0])
        for i, (problem, tokens) in enumerate(zip(operands.tolist(), responses.tolist())):
            out[i] = float(self.check(tuple(problem[:-1]), problem[-1], self.parse(tokens)))
        return out


@functools.lru_cache(maxsize=1 << 16)
def _canonical_solution(numbers: tuple[int, ...], target: int, ops: str, max_value: int):
    def search(pool: tuple[int, ...], depth: int):
        for i in range(len(pool)):
            for j in range(i + 1, len(pool)):
                x, y = max(pool[i], pool[j]), min(pool[i], pool[j])
                rest = tuple(v for k, v in enumerate(pool) if k not in (i, j))
                for op in ops:
                    z = _apply(op, x, y)
                    if not 0 <= z <= max_value:
                        continue
                    if depth == 1:
                        if z == target:
                            return [(x, op, y, z)]
                    else:
                        tail = search(rest + (z,), depth - 1)
                        if tail is not None:
                            return [(x, op, y, z)] + tail
        return None

    for depth in range(1, len(numbers)):
        found = search(numbers, depth)
        if found is not None:
            return found
    return None


Task = Union[AdditionTask, CountdownTask]


def task_settings(task_cfg) -> dict:
    """``engine.task`` with every key of its task filled in from the defaults; raises on unknown keys."""
    cfg = dict(task_cfg or {})
    name = cfg.pop("name", "addition")  # configs written before the countdown task name none
    if name not in SUPPORTED_TASKS:
        raise ValueError(f"engine.task.name={name!r} is invalid: allowed {SUPPORTED_TASKS}")
    unknown = sorted(set(cfg) - set(TASK_KEYS[name]))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join('engine.task.' + k for k in unknown)} for task {name!r}: "
                         f"allowed {sorted(TASK_KEYS[name])}")
    return {"name": name, **TASK_KEYS[name], **cfg}


def build_task(task_cfg) -> Task:
    """The task named by ``engine.task`` (a mapping with ``name`` and its parameters)."""
    cfg = task_settings(task_cfg)
    name = cfg.pop("name")
    if name == "addition":
        return AdditionTask(**cfg)
    return CountdownTask(**cfg)
