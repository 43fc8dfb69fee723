"""Stand-in for NeMo-RL (see tests/nemo_rl_standin/README.md). Generation from ``NEMO_RL_STANDIN_GENERATION``."""

import os

GENERATION = os.environ.get("NEMO_RL_STANDIN_GENERATION", "main")
if GENERATION not in ("main", "v0.6"):
    raise ImportError(f"NEMO_RL_STANDIN_GENERATION={GENERATION!r}: allowed 'main' or 'v0.6'")
__version__ = {"main": "0.8.0+standin", "v0.6": "0.6.0+standin"}[GENERATION]
