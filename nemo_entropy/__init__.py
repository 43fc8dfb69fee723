"""nemo-entropy: entropy controls for RL of reasoning LLMs on NeMo-RL and Megatron-core.

The core (config, parallel, selection, losses, entropy) needs only torch; NeMo-RL, megatron-core,
transformers and the compiled kernels are imported lazily where they are used.
"""

__version__ = "0.1.0"
