"""The ``nemo-entropy`` command: one entry, subcommands dispatched lazily to their modules.

Each subcommand lives with the concept it drives; this file only routes, so importing it costs nothing
(no NeMo-RL, megatron-core, transformers or compiled kernels are imported until a subcommand needs them).
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

# name -> (module, function, one-line help)
SUBCOMMANDS = {
    "train": ("nemo_entropy.train", "main", "run GRPO with an entropy control (local engine or NeMo-RL)"),
    "compare": ("nemo_entropy.engine.compare", "main", "GRPO, Clip-Cov and KL-Cov locally over several seeds: mean, 95% interval, plot with bands"),
    "demo": ("nemo_entropy.demo", "main", "the losses on a synthetic batch: selected fraction, entropy proxy, loss"),
    "build-kernels": ("nemo_entropy.entropy.build", "main", "build the CPU (and, with CUDA, GPU) kernels"),
    "law": ("nemo_entropy.law.cli", "main", "fit the entropy-performance law R = -a exp(H) + b to runs; diagnostics"),
    "check-nemo-rl": ("nemo_entropy.integrations.preflight", "main",
                      "check that the installed NeMo-RL fits the run entry and the loss adapter (seconds, no GPU)"),
    "check-kernels": ("nemo_entropy.entropy.check", "main", "which entropy backend 'auto' uses here; check it against float64"),
}


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: nemo-entropy <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, desc) in SUBCOMMANDS.items()]
    lines += ["", "Run 'nemo-entropy <command> --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"nemo-entropy: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
