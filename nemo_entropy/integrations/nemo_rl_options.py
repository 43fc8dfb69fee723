"""Our ``nemo_rl:`` section of a run config: its defaults and its checks, in one frozen object.

The run entry, the installed loss (:class:`~nemo_entropy.integrations.nemo_rl.EntropyControlLossFn`) and the
driver-side wrapper (:class:`~nemo_entropy.integrations.step_plan.StepPlanPolicy`) all take their options through
:class:`NemoRLOptions`, so a default or an allowed value is written once (docs/config_reference.md).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

__all__ = ["NemoRLOptions", "PLAN_WHERE", "INPUT_TYPES"]

PLAN_WHERE = ("driver", "worker")
INPUT_TYPES = ("logprob", "logit")
_DEPRECATED = {"selection": "plan"}
"""Old key -> new key: still accepted, with a warning."""


@dataclass(frozen=True)
class NemoRLOptions:
    """The ``nemo_rl:`` section, validated on construction (errors name the key, the value and what is allowed)."""

    root: Optional[str] = None
    """The NeMo-RL checkout (default: ``$NEMO_RL_ROOT``, else the installed ``nemo_rl`` package's checkout)."""
    base_config: str = "examples/configs/grpo_math_1B.yaml"
    """NeMo-RL's config under ours, relative to the checkout."""
    plan: str = "driver"
    """Where the step plan is built: ``driver`` (over the whole step, before NeMo-RL shards the batch; exact for
    any layout) or ``worker`` (inside the Megatron workers, over each loss call across DP; docs/nemo_rl.md)."""
    input_type: str = "logprob"
    """What NeMo-RL hands the loss: ``logprob`` or ``logit`` (needed by controls that read the current logits)."""
    log_entropy: bool = True
    """Log the full-vocabulary entropy when the loss gets logits."""

    def __post_init__(self) -> None:
        for key, allowed in (("plan", PLAN_WHERE), ("input_type", INPUT_TYPES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"nemo_rl.{key}={getattr(self, key)!r} is invalid: allowed one of {allowed}")
        if not isinstance(self.log_entropy, bool):
            raise ValueError(f"nemo_rl.log_entropy={self.log_entropy!r} is invalid: allowed true or false")
        if not isinstance(self.base_config, str) or not self.base_config.endswith((".yaml", ".yml")):
            raise ValueError(f"nemo_rl.base_config={self.base_config!r} is invalid: allowed a YAML path relative to "
                             "the NeMo-RL checkout")

    @classmethod
    def from_section(cls, section: Union["NemoRLOptions", Mapping[str, Any], None] = None) -> "NemoRLOptions":
        """The options of a ``nemo_rl:`` mapping (missing keys take their defaults); a ``NemoRLOptions`` passes."""
        if isinstance(section, NemoRLOptions):
            return section
        values = dict(section or {})
        for old, new in _DEPRECATED.items():
            if old in values:
                warnings.warn(f"nemo_rl.{old} is deprecated: it is nemo_rl.{new} now (the whole step plan is built "
                              f"there, not only the selection)", FutureWarning, stacklevel=3)
                if new in values and values[new] != values[old]:
                    raise ValueError(f"nemo_rl.{old}={values[old]!r} and nemo_rl.{new}={values[new]!r} disagree: keep "
                                     f"nemo_rl.{new} only")
                values[new] = values.pop(old)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"nemo_rl.{unknown[0]} is not a known key; known: {sorted(known)}")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """The plain section (what a resolved run config holds)."""
        return dataclasses.asdict(self)
