"""The entropy-performance law ``R = -a exp(H) + b`` read off real runs, and the paper's diagnostics.

- :func:`read_run` (``readers``): every scalar of a run from our ``metrics.jsonl``, TensorBoard events
  (NeMo-RL's logger) or a CSV export; :func:`resolve_key` (``keys``) picks the entropy / performance keys;
  :func:`pair_series` (``series``) pairs them on step and counts the steps it drops.
- :func:`fit_law`, :func:`bootstrap_law` (``fit``): closed-form least squares, percentile-bootstrap intervals.
- :func:`fit_run` (``heldout``): fit the first part of a run, predict the rest (``rmse_heldout``).
- :func:`law_agreement` (``agreement``): do several runs share ``a`` and ``b``?
- :func:`entropy_change_correlation` (``entropy_change``) and, in ``nemo_entropy.law.concentration`` (it needs
  torch, so this package does not import it), :func:`~nemo_entropy.law.concentration.covariance_concentration`:
  pure diagnostics for the trainer and the NeMo-RL adapter to log.
- ``nemo-entropy law fit`` / ``law diagnose`` (``cli``). Reference: docs/law.md.

The fitting side needs only numpy (tensorboard and matplotlib are imported when used), so ``law fit`` on a CSV
does not pay for torch.
"""

from .agreement import RULE as AGREEMENT_RULE
from .agreement import LawAgreement, law_agreement
from .entropy_change import EntropyChangeCorrelation, entropy_change_correlation, same_step_correlation
from .fit import LawFit, LawIntervals, bootstrap_law, fit_law, predict_performance
from .heldout import RunLaw, fit_run, split_points
from .keys import ENTROPY_KEYS, PERFORMANCE_KEYS, PREDICTION_KEYS, resolve_key
from .readers import read_run
from .series import LawInputError, RunScalars, RunSeries, pair_series

__all__ = [
    "AGREEMENT_RULE", "LawAgreement", "law_agreement", "EntropyChangeCorrelation", "entropy_change_correlation",
    "same_step_correlation",
    "LawFit", "LawIntervals", "bootstrap_law", "fit_law", "predict_performance", "RunLaw", "fit_run",
    "split_points", "ENTROPY_KEYS", "PERFORMANCE_KEYS", "PREDICTION_KEYS", "resolve_key", "read_run",
    "LawInputError", "RunScalars", "RunSeries", "pair_series",
]

