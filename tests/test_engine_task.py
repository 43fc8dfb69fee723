"""The countdown task of the local engine (verifier against brute force, generation, encoding), the pass@k
estimator against an enumeration over subsets, and the multi-seed comparison's statistics against hand
computations."""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter

import pytest
import torch

from nemo_entropy.engine.compare import aggregate, parse_seeds, summarise
from nemo_entropy.engine.intervals import mean_interval, t_quantile
from nemo_entropy.engine.passk import pass_at_k, pass_at_k_metrics
from nemo_entropy.engine.task import (
    BOS, COMMA, DIGIT0, EOS, EQUALS, MINUS, PAD, PLUS, TIMES, CountdownTask, build_task, decode, encode_digits,
)

SMALL = CountdownTask(numbers=3, max_number=6, max_value=30, min_target=5, ops="+-*")


# ----------------------------------------------------------------------------------------------- references
def reference_accepts(task: CountdownTask, numbers, target, text: str) -> bool:
    """An independent verifier on the decoded text: regular expressions, Python's eval, multiset arithmetic."""
    if "<eos>" not in text:
        return False
    body = text[: text.index("<eos>")]
    if not body:
        return False
    pool = Counter(numbers)
    value = None
    width = len(str(task.max_value))
    for step in body.split(","):
        m = re.fullmatch(r"(0|[1-9]\d*)([-+*])(0|[1-9]\d*)=(0|[1-9]\d*)", step)
        if m is None or m.group(2) not in task.ops or any(len(m.group(g)) > width for g in (1, 3, 4)):
            return False
        x, y, z = int(m.group(1)), int(m.group(3)), int(m.group(4))
        if eval(f"{x}{m.group(2)}{y}") != z or not 0 <= z <= task.max_value:  # noqa: S307 - digits and one operator
            return False
        need = Counter([x, y])
        if any(pool[v] < c for v, c in need.items()):
            return False
        pool = pool - need + Counter([z])
        value = z
    return value == target


def all_step_sequences(numbers):
    """Every scratchpad over ``numbers``: each step takes two pool entries (both orders), any operation of
    ``+-*``, and writes the true result or a wrong one (true + 1); out-of-range results are kept too."""
    def extend(pool, prefix):
        if prefix:
            yield list(prefix)
        for i, j in itertools.permutations(range(len(pool)), 2):
            x, y = pool[i], pool[j]
            rest = [v for k, v in enumerate(pool) if k not in (i, j)]
            for op in "+-*":
                true = eval(f"{x}{op}{y}")  # noqa: S307
                for z in {true, true + 1}:
                    if z >= 0:                  # a negative number cannot be written (no minus sign)
                        yield from extend(rest + [z], prefix + [(x, op, y, z)])
    yield from extend(list(numbers), [])


def brute_force_values(task: CountdownTask, numbers) -> set[int]:
    """Every value of an expression with at least one operation over a sub-multiset of ``numbers`` (each at
    most once) whose intermediate results all lie in ``[0, max_value]``: the targets a scratchpad can reach."""
    values = set()

    def combine(items):
        for i, j in itertools.combinations(range(len(items)), 2):
            rest = [v for k, v in enumerate(items) if k not in (i, j)]
            for op in task.ops:
                for a, b in ((items[i], items[j]), (items[j], items[i])):
                    z = eval(f"{a}{op}{b}")  # noqa: S307
                    if 0 <= z <= task.max_value:
                        values.add(z)
                        combine(rest + [z])
    combine(list(numbers))
    return values


def as_expression(numbers, steps) -> str:
    """The scratchpad as one expression: each step's operands replaced by the expressions they came from."""
    entries = [(v, str(v)) for v in numbers]
    for x, op, y, z in steps:
        ex = entries.pop(next(k for k, (v, _) in enumerate(entries) if v == x))[1]
        ey = entries.pop(next(k for k, (v, _) in enumerate(entries) if v == y))[1]
        entries.append((z, f"({ex}{op}{ey})"))
    return entries[-1][1]


def as_tensor(task, rows):
    out = torch.full((len(rows), task.max_response_length + 4), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[: out.shape[1]])
    return out


# ----------------------------------------------------------------------------------------------- verifier
@pytest.mark.parametrize("numbers", [(2, 3, 5), (4, 4, 1), (6, 2, 2), (1, 1, 1)])
def test_verifier_agrees_with_an_independent_check_on_every_scratchpad(numbers):
    sequences = list(all_step_sequences(numbers))
    rows = [SMALL.format_steps(s) for s in sequences]
    reachable = brute_force_values(SMALL, numbers)
    targets = sorted(reachable)[::3] + [SMALL.max_value, 29]
    accepted_any = set()
    for target in targets:
        problem = torch.tensor([[*numbers, target]]).expand(len(rows), -1)
        got = SMALL.rewards(problem, as_tensor(SMALL, rows)).tolist()
        for seq, row, reward in zip(sequences, rows, got):
            assert reward == float(reference_accepts(SMALL, numbers, target, decode(row))), (numbers, target, decode(row))
            if reward:
                accepted_any.add(target)
                # An accepted scratchpad is an expression over allowed numbers that evaluates to the target.
                expression = as_expression(numbers, seq)
                assert eval(expression) == target  # noqa: S307
                assert not Counter(int(t) for t in re.findall(r"\d+", expression)) - Counter(numbers)
    # Some scratchpad is accepted exactly for the targets an expression over the numbers reaches.
    assert accepted_any == {t for t in targets if t in reachable}


def test_canonical_solution_exists_exactly_for_reachable_targets_and_is_shortest():
    for numbers in itertools.combinations_with_replacement(range(1, 5), 3):
        sequences = list(all_step_sequences(numbers))
        reachable = brute_force_values(SMALL, numbers)
        for target in range(0, 26):
            accepted = [s for s in sequences if SMALL.check(numbers, target, s)]
            assert bool(accepted) == (target in reachable), (numbers, target)
            solution = SMALL.solve(numbers, target)
            assert (solution is not None) == bool(accepted), (numbers, target)
            if solution is not None:
                assert SMALL.check(numbers, target, solution)
                assert len(solution) == min(len(s) for s in accepted), (numbers, target)


def test_wrong_responses_are_rejected():
    task = CountdownTask(numbers=4, max_number=9, max_value=99, min_target=10, ops="+-*")
    numbers, target = (4, 4, 8, 5), 19
    good = [(4, "*", 4, 16), (8, "-", 5, 3), (16, "+", 3, 19)]
    assert task.check(numbers, target, good)
    cases = {
        "wrong arithmetic": [(4, "*", 4, 17), (8, "-", 5, 3), (17, "+", 3, 20)],
        "final value is not the target": [(4, "*", 4, 16), (16, "+", 8, 24)],
        "number not given": [(9, "+", 8, 17), (17, "+", 2, 19)],
        "number used twice": [(8, "+", 8, 16), (16, "-", 5, 11), (11, "+", 8, 19)],
        "intermediate used twice": [(8, "+", 5, 13), (13, "+", 4, 17), (13, "+", 4, 17)],
        "negative result": [(4, "-", 8, -4)],
        "empty": [],
    }
    for why, steps in cases.items():
        assert not task.check(numbers, target, steps), why
    rows = {
        "good": task.format_steps(good),
        "no EOS (truncated)": task.format_steps(good)[:-1],
        "EOS only": [EOS],
        "leading zero": encode_digits(4) + [TIMES] + [DIGIT0, DIGIT0 + 4] + task.format_steps(good)[3:],
        "trailing comma": task.format_steps(good)[:-1] + [COMMA, EOS],
        "two operators": encode_digits(4) + [PLUS, MINUS] + encode_digits(4) + [EQUALS] + encode_digits(8) + [EOS],
        "garbage after EOS is ignored": task.format_steps(good) + [PLUS, PLUS],
        "BOS inside": [BOS] + task.format_steps(good),
        "number wider than max_value": encode_digits(4) + [TIMES] + encode_digits(4) + [EQUALS] + encode_digits(100) + [EOS],
    }
    problem = torch.tensor([[*numbers, target]]).expand(len(rows), -1)
    got = dict(zip(rows, task.rewards(problem, as_tensor(task, list(rows.values()))).tolist()))
    assert got == {k: float(k in ("good", "garbage after EOS is ignored")) for k in rows}
    plus_minus = CountdownTask(numbers=4, max_number=9, max_value=99, min_target=10, ops="+-")
    assert not plus_minus.check(numbers, target, good)                       # '*' is not allowed there


# ----------------------------------------------------------------------------------------------- generation
def test_problem_generation_is_deterministic_in_range_and_solvable():
    task = CountdownTask()
    a = task.sample_operands(300, seed=11)
    assert torch.equal(a, task.sample_operands(300, seed=11))
    assert not torch.equal(a, task.sample_operands(300, seed=12))
    assert torch.equal(task.sample_operands(40, seed=11), a[:40])           # a prefix of the same stream
    for row in a.tolist()[:60]:
        numbers, target = tuple(row[:-1]), row[-1]
        assert all(1 <= n <= task.max_number for n in numbers)
        assert task.min_target <= target <= task.max_value and target not in numbers
        assert target in brute_force_values(task, numbers)                 # solvable (independent search)
    answers = task.answers(a)
    assert task.rewards(a, answers).tolist() == [1.0] * 300                 # the canonical solutions verify
    small = CountdownTask(numbers=3, max_number=4, max_value=20, min_target=5, ops="+-")
    for row in small.sample_operands(100, seed=3).tolist():
        assert row[-1] in brute_force_values(small, tuple(row[:-1]))


def test_prompt_and_response_encoding_round_trip():
    task = CountdownTask(numbers=4, max_number=12, max_value=150, min_target=10, ops="+-*")
    problems = task.sample_operands(50, seed=5)
    prompts = task.prompts(problems)
    assert prompts.shape == (50, task.prompt_length)
    for row, prompt in zip(problems.tolist(), prompts.tolist()):
        text = decode(prompt)
        m = re.fullmatch(r"<bos>(\d\d),(\d\d),(\d\d),(\d\d):(\d\d\d)=", text)
        assert m is not None, text
        assert [int(g) for g in m.groups()] == row
    for row, answer in zip(problems.tolist(), task.answers(problems).tolist()):
        steps = task.solve(tuple(row[:-1]), row[-1])
        assert task.parse(answer) == steps
        text = decode(answer).replace("<pad>", "")
        assert text == ",".join(f"{x}{op}{y}={z}" for x, op, y, z in steps) + "<eos>"
        assert len(task.format_steps(steps)) <= task.max_response_length


@pytest.mark.parametrize("cfg, key", [
    ({"name": "countdown", "numbers": 1}, "engine.task.numbers"),
    ({"name": "countdown", "ops": "+/"}, "engine.task.ops"),
    ({"name": "countdown", "max_value": 5, "max_number": 9}, "engine.task.max_value"),
    ({"name": "countdown", "digits": 2}, "engine.task.digits"),
    ({"name": "sudoku"}, "engine.task.name"),
])
def test_invalid_task_settings_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        build_task(cfg)


# ----------------------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration_over_subsets(n):
    for c in range(n + 1):
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            hit = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(hit, abs=1e-12), (n, c, k)


def test_pass_at_k_metrics_average_problems():
    got = pass_at_k_metrics([0, 1, 4], num_samples=4)
    assert list(got) == ["pass@1", "pass@2", "pass@4"]
    assert got["pass@1"] == pytest.approx((0 + 0.25 + 1) / 3)
    assert got["pass@2"] == pytest.approx((0 + 0.5 + 1) / 3)               # 1 - C(3,2)/C(4,2) = 0.5
    assert got["pass@4"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)


# ----------------------------------------------------------------------------------------------- compare
def test_t_quantiles_match_the_table():
    # Two-sided 95% critical values of Student's t (any statistics table).
    for df, value in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(value, abs=1e-4), df
    assert t_quantile(0.95, 4) == pytest.approx(2.1318, abs=1e-4)


def test_mean_interval_against_hand_computation():
    stat = mean_interval([0.2, 0.4, 0.3, 0.5, 0.1])
    # mean 0.3; s^2 = (0.01 + 0.01 + 0 + 0.04 + 0.04) / 4 = 0.025; half = 2.7764 * sqrt(0.025 / 5) = 0.19632
    assert stat["n"] == 5 and stat["mean"] == pytest.approx(0.3)
    assert stat["std"] == pytest.approx(math.sqrt(0.025))
    assert stat["half"] == pytest.approx(0.196324, abs=1e-5)
    assert (stat["low"], stat["high"]) == pytest.approx((0.3 - 0.196324, 0.3 + 0.196324), abs=1e-5)
    one = mean_interval([0.7])
    assert one["mean"] == 0.7 and one["half"] is None
    assert mean_interval([])["mean"] is None


def test_aggregate_over_seeds_and_summary_windows():
    records = [{"step": 0, "val_accuracy": 0.1}]
    for step in range(1, 21):
        records.append({"step": step, "entropy_mean": 1.0 - step / 40, "reward_mean": step / 20,
                        "selected_tokens": 6.0, "optimizer_steps": 2.0, "valid_tokens_per_optimizer_step": 2500.0,
                        "response_length_mean": 15.6, **({"val_accuracy": step / 25} if step % 10 == 0 else {})})
    records[-1].update({"pass@1": 0.25, "pass@2": 0.5})
    s = summarise(records)
    # window = 20 // 10 = 2 steps: entropy of steps 19 and 20 = (0.525 + 0.5) / 2
    assert s["entropy_final"] == pytest.approx(0.5125) and s["reward_final"] == pytest.approx(0.975)
    assert s["val_accuracy_final"] == pytest.approx(0.8) and s["val_accuracy_start"] == 0.1
    assert s["selected_tokens_per_optimizer_step_mean"] == 3.0 and s["pass@2"] == 0.5
    per_seed = {1: {"entropy_final": 0.2, "pass@1": 0.1}, 2: {"entropy_final": 0.4, "pass@1": 0.3}}
    agg = aggregate(per_seed)
    # two seeds: half = t(0.975, 1) * s / sqrt(2) with s = sqrt(0.02) -> 12.7062 * 0.1 = 1.27062
    assert agg["entropy_final"]["mean"] == pytest.approx(0.3)
    assert agg["entropy_final"]["half"] == pytest.approx(1.27062, abs=1e-4)
    assert agg["pass@1"]["mean"] == pytest.approx(0.2)
    assert agg["val_accuracy_final"]["n"] == 0


def test_parse_seeds():
    assert parse_seeds("5", 42) == [42, 43, 44, 45, 46]
    assert parse_seeds("1,7,3", 42) == [1, 7, 3]
    assert parse_seeds("42,", 0) == [42] and parse_seeds("1", 42) == [42]
    for bad in ("0", "x", "1,1", "42"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad, 42)
