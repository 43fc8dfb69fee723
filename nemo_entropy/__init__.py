"""nemo-entropy: entropy controls for RL of reasoning LLMs on NeMo-RL and Megatron-core.

The core (parallel, exact, controls, config, plan, selection, losses, entropy) needs only torch; NeMo-RL,
megatron-core, Triton, transformers and the compiled kernels are imported where they are used. Imports go one way,
bottom to top (README, "Architecture"; tests/test_imports.py).
"""

__version__ = "0.1.0"
