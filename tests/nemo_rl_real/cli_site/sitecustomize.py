"""Loaded at interpreter start-up by the CLI harness's processes only (this folder is first on their PYTHONPATH).

When ``NEMO_ENTROPY_HARNESS_CLI`` is set, it patches two NeMo-RL functions right after their modules are imported
(``tests/nemo_rl_real/cli_setup.py`` says which and why); otherwise it does nothing. Everything else the command
runs is unmodified.
"""

import importlib.abc
import importlib.util
import os
import sys

if os.environ.get("NEMO_ENTROPY_HARNESS_CLI"):

    PATCHED_MODULES = ("nemo_rl.data.utils", "nemo_rl.algorithms.grpo")  # as cli_setup.PATCHED_MODULES

    class _PatchAfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname not in PATCHED_MODULES:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                from tests.nemo_rl_real.cli_setup import patch

                patch(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _PatchAfterImport())
