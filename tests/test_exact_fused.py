"""The fused passes and the faster top-k pieces give exactly what the plain ones give (nemo_entropy.exact)."""

import pytest
import torch

import nemo_entropy.exact as exact
from nemo_entropy.covariance_diagnostics import local_diagnostic_sums, scores_and_diagnostic_sums
from nemo_entropy.exact import (_lexicographic_order, fixed_point_sum, fixed_point_sums, flat_nonzero,
                                scores_from_means)


@pytest.mark.parametrize("n", [0, 5, 1023, 1024, 1031, 100_003])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
def test_flat_nonzero_is_nonzero(n, density):
    gen = torch.Generator().manual_seed(n)
    flags = torch.rand(n + 8, generator=gen) < density
    for view in (flags[:n], flags[3:3 + n]):  # an aligned and a misaligned storage offset
        assert torch.equal(flat_nonzero(view), view.nonzero().squeeze(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lexicographic_order_matches_float_sorts(dtype):
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 100, 5000):
        for ints in (True, False):
            p = (torch.randint(-3, 3, (n,), generator=gen).double() if ints
                 else torch.randn(n, generator=gen, dtype=torch.float64))
            for value, share in ((-0.0, 0.1), (0.0, 0.1), (float("-inf"), 0.05), (float("inf"), 0.05)):
                p[torch.rand(n, generator=gen) < share] = value
            p = p.to(dtype)
            uids = torch.randint(0, 50, (n,), generator=gen)  # repeated uids: ties in (priority, uid)
            by_uid = torch.argsort(uids, stable=True)
            expected = by_uid[torch.argsort(p[by_uid], descending=True, stable=True)]
            assert torch.equal(_lexicographic_order(p, uids), expected)


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 18])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fixed_point_sums_equal_the_plain_sums(monkeypatch, chunk, dtype):
    monkeypatch.setattr(exact, "_CHUNK_TOKENS", chunk)
    gen = torch.Generator().manual_seed(1)
    mask = torch.arange(300)[None, :] < torch.randint(0, 301, (13, 1), generator=gen)
    a = (torch.randn(13, 300, generator=gen) * 3).to(dtype).masked_fill(~mask, float("nan"))
    b = torch.randn(13, 300, generator=gen).to(dtype).masked_fill(~mask, float("-inf"))
    values = [a, b, (a, b)]
    for world in (1, 8):
        got = fixed_point_sums(values, mask, world)
        expected = [fixed_point_sum(v, mask, world) for v in values]
        assert [(int(t), p) for t, p in got] == [(int(t), p) for t, p in expected]
    bad = a.clone()
    bad[mask.nonzero()[0].tolist()] = float("inf")  # on a valid token: problem 1
    assert [p for _, p in fixed_point_sums([bad, b], mask, 1)] == [1, 0]
    huge = torch.where(mask, torch.full_like(a, 2.0**30), a)  # too large for the chunks' float64: the plain way
    assert [(int(t), p) for t, p in fixed_point_sums([huge], mask, 1)] == [
        (int(t), p) for t, p in [fixed_point_sum(huge, mask, 1)]]
    assert fixed_point_sums([huge], mask, 2**20)[0][1] == 2  # too large for exact sums at all


@pytest.mark.parametrize("chunk", [300, 1 << 18])
@pytest.mark.parametrize("form", ["natural", "vanilla"])
@pytest.mark.parametrize("theorem", [False, True])
def test_scores_and_diagnostic_sums_equal_the_two_calls(monkeypatch, chunk, form, theorem):
    monkeypatch.setattr(exact, "_CHUNK_TOKENS", chunk)
    gen = torch.Generator().manual_seed(2)
    mask = torch.arange(500)[None, :] < torch.randint(1, 501, (9, 1), generator=gen)
    old = (-torch.rand(9, 500, generator=gen) * 3).masked_fill(~mask, float("-inf"))
    adv = torch.randn(9, 1, generator=gen).expand(9, 500)  # not contiguous
    inputs = (torch.rand(9, 500, generator=gen), torch.randn(9, 500, generator=gen) * 0.1) if theorem else None
    mean_l, mean_x = torch.tensor(-1.5, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64)
    scores, sums = scores_and_diagnostic_sums(old, adv, mask, mean_l, mean_x, form, 4, theorem_inputs=inputs)
    # the whole-step formula, as scores_from_means computed it before the chunks
    l, a = old.float(), adv.float()
    x = a - mean_x.float() if form == "natural" else torch.exp(l).mul_(a).sub_(mean_x.float())
    expected = torch.where(mask, (l - mean_l.float()).mul_(x), torch.zeros(()))
    assert torch.equal(scores_from_means(old, adv, mask, mean_l, mean_x, form), expected)
    assert torch.equal(scores, expected)
    assert torch.equal(sums, local_diagnostic_sums(expected, old, adv, mask, mean_l, 4, theorem_inputs=inputs))
