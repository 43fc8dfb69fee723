"""``ppo``: no entropy control. The surrogate is PPO's (or, with NeMo-RL's keys, GRPO / REINFORCE / GSPO / CISPO's),
exactly ``ClippedPGLossFn``'s; the plan still carries the step's exact covariance scores, so a baseline run logs
the same covariance diagnostics as the controlled ones."""

from __future__ import annotations

from .base import Control


class PPO(Control):
    name = "ppo"
