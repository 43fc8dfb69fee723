"""The real-NeMo-RL harness (issue 9): NeMo-RL's own ``grpo_train`` on CPU with the plugin installed.

Collected only when ``NEMO_RL_ROOT`` points at a NeMo-RL checkout (see tests/conftest.py); run it with
``make test-nemo-rl NEMO_RL_ROOT=<checkout>``. docs/nemo_rl.md, "The real-NeMo-RL harness", lists every stub.
"""
