"""Which scalar of a run is the entropy, the performance or the predicted entropy change.

One ordered list per role, shared by every source; the first name present in a run is used, and the tool
always prints the name it used. The names come from the loggers users have:

- ours (``metrics.jsonl``): ``entropy_mean``, ``val_accuracy`` (every ``val_period`` steps), ``reward_mean``;
  in our TensorBoard events the same values are ``entropy/entropy_mean``, ``val/accuracy``,
  ``train/reward_mean``;
- NeMo-RL's logger (TensorBoard, W&B): ``train/entropy`` (the full-vocabulary entropy our loss adapter logs when
  it receives logits), ``train/approx_entropy`` (NeMo-RL's own sampled-token estimate, a different quantity:
  last resort), ``validation/accuracy``, ``train/reward``;
- verl: ``actor/entropy``.

Validation accuracy comes before the training reward because the law is about task performance and the
reward of a GRPO batch is noisier (it depends on which prompts were drawn).
"""

from __future__ import annotations

from typing import Optional, Sequence

from .series import LawInputError, RunScalars, format_available

ENTROPY_KEYS = ("entropy_mean", "train/entropy", "entropy/entropy_mean", "actor/entropy", "train/approx_entropy")
PERFORMANCE_KEYS = ("val_accuracy", "validation/accuracy", "val/accuracy",
                    "reward_mean", "train/reward", "train/reward_mean")
# -lr * Cov(log pi, pi A) per step, as the trainer (``entropy_change_predicted``), our TensorBoard (keys that
# start with "entropy" go under ``entropy/``) and the NeMo-RL adapter (``train/``) would log it.
PREDICTION_KEYS = ("entropy_change_predicted", "entropy/entropy_change_predicted",
                   "train/entropy_change_predicted")
# The entropy change measured on the prediction's own tokens after its step (engine.entropy_change_check).
OBSERVED_CHANGE_KEYS = ("entropy_change_observed", "entropy/entropy_change_observed")
STEP_COLUMNS = ("step", "Step", "_step", "global_step")


def _matches(available: Sequence[str], name: str) -> list[str]:
    """Columns called ``name``, or, in a W&B chart export, ``"<run name> - <name>"``."""
    if name in available:
        return [name]
    return [k for k in available if k.endswith(f" - {name}")]


def resolve_key(scalars: RunScalars, requested: Optional[str], defaults: Sequence[str], *,
                role: str, flag: str, hint: str = "") -> str:
    """The key of ``scalars`` to use for ``role``: ``requested`` if given, else the first default present.

    Raises :class:`LawInputError` naming the file, the key (or the defaults tried), the flag that chooses it
    and the keys that are available (then ``hint``, if any); a name matching several W&B columns is refused
    as ambiguous.
    """
    available = scalars.keys()
    names = [requested] if requested is not None else list(defaults)
    for name in names:
        found = _matches(available, name)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise LawInputError(
                f"{scalars.path}: {role} key {name!r} matches several columns {found}; "
                f"pass the full column name with {flag}")
    if requested is not None:
        raise LawInputError(
            f"{scalars.path}: no {role} key {requested!r} ({flag}){scalars.why_missing(requested)}; "
            f"available: {format_available(available)}{hint}")
    rejected = [f"{k!r} ({scalars.rejected[k]})" for name in names for k in _matches(sorted(scalars.rejected), name)]
    if rejected:
        raise LawInputError(
            f"{scalars.path}: the {role} column {rejected[0]} was rejected; choose another with {flag}; "
            f"available: {format_available(available)}{hint}")
    raise LawInputError(
        f"{scalars.path}: none of the default {role} keys {list(defaults)} is present; choose one with {flag}; "
        f"available: {format_available(available)}{hint}")
