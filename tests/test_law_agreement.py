"""nemo_entropy.law.agreement: the interval rule on hand-made intervals, and runs drawn from one law agree while
runs drawn from clearly different laws do not."""

from __future__ import annotations

import numpy as np
import pytest

from nemo_entropy.law import LawInputError, fit_run, law_agreement
from nemo_entropy.law.fit import LawFit, LawIntervals
from nemo_entropy.law.heldout import RunLaw, Split
from tests.test_law_fit import draw_law, make_series


def law_with_intervals(a_interval, b_interval):
    series = make_series([0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    mask = np.ones(3, dtype=bool)
    return RunLaw(series=series, split=Split(fit=mask, heldout=~mask, rule="all"),
                  fit=LawFit(a=sum(a_interval) / 2, b=sum(b_interval) / 2, n=3, rmse=0.0),
                  intervals=LawIntervals(a=a_interval, b=b_interval, ceiling=(0.0, 1.0), level=0.95, resamples=100,
                                         degenerate=0, seed=0),
                  rmse_heldout=None)


def test_rule_is_a_common_value_of_all_intervals():
    # a: [0, 1], [0.5, 2], [0.9, 3] share [0.9, 1]; b: [0, 1] and [1.1, 2] do not overlap
    laws = [law_with_intervals((0.0, 1.0), (0.0, 1.0)), law_with_intervals((0.5, 2.0), (0.2, 1.05)),
            law_with_intervals((0.9, 3.0), (1.1, 2.0))]
    result = law_agreement(laws)
    assert result.a.agree and result.a.common == (0.9, 1.0)
    assert not result.b.agree and result.b.common is None
    assert not result.agree
    # the pair that proves the disagreement: run 0 ends lowest (1.0), run 2 starts highest (1.1)
    assert result.to_json()["b"]["furthest_apart"] == [0, 2]
    # pairwise overlap is not enough to be checked pair by pair only for neighbours: [0,1], [0.5,0.6], [0.7,2]
    # overlap 0-1 and 0-2 but not 1-2, and the rule must see it
    chain = [law_with_intervals((0.0, 1.0), (0, 1)), law_with_intervals((0.5, 0.6), (0, 1)),
             law_with_intervals((0.7, 2.0), (0, 1))]
    assert not law_agreement(chain).a.agree
    # intervals that touch share a value
    assert law_agreement([law_with_intervals((0.0, 1.0), (0, 1)), law_with_intervals((1.0, 2.0), (0, 1))]).agree


def test_agreement_needs_two_runs_with_intervals():
    h, r = draw_law(30, seed=0)
    with pytest.raises(LawInputError, match="at least 2 runs"):
        law_agreement([fit_run(make_series(h, r), bootstrap=200)])
    with pytest.raises(LawInputError, match="--bootstrap 0"):
        law_agreement([fit_run(make_series(h, r), bootstrap=0), fit_run(make_series(h, r), bootstrap=200)])


def test_runs_from_one_law_agree_and_from_different_laws_do_not():
    # three "algorithms" on one model: the same a, b, different noise and entropy trajectories
    same = [fit_run(make_series(*draw_law(120, a=0.6, b=0.95, noise=0.02, seed=s, h_range=rng)), fit_fraction=1,
                    bootstrap=1000, seed=s)
            for s, rng in ((1, (0.05, 1.2)), (2, (0.1, 1.0)), (3, (0.02, 1.4)))]
    result = law_agreement(same)
    assert result.agree, result.to_json()
    # another model: a, b clearly different
    other = fit_run(make_series(*draw_law(120, a=0.3, b=0.7, noise=0.02, seed=4)), fit_fraction=1, bootstrap=1000)
    mixed = law_agreement(same + [other])
    assert not mixed.agree
    assert not mixed.a.agree and not mixed.b.agree
    assert 3 in mixed.to_json()["a"]["furthest_apart"]
