"""torchrun for one Slurm node, keeping the trainer's "requeue me" exit code.

``slurm/launch.sh`` runs this once per node (``srun --ntasks-per-node=1``)::

    python slurm/torchrun_node.py --head-node n1 -- <torchrun arguments> -m nemo_entropy.train ...

Two things plain ``torchrun`` gets wrong for us:

- When a worker exits with code 3 (checkpoint saved, please requeue: contract of
  ``nemo_entropy.engine.REQUEUE_EXIT_CODE``), torchrun reports a generic failure and exits 1. Here,
  when every failed local worker exited with 3, this process exits 3 too, so ``srun`` and then the
  launcher see the request.
- The c10d rendezvous store is hosted by the agent whose host name matches the endpoint. With
  several Slurm nodes on one machine (tests, or nodes sharing an address) every agent matches;
  we state explicitly that only the head node's agent hosts it (``is_host``).
"""

from __future__ import annotations

import argparse
import os
import sys

REQUEUE_EXIT_CODE = 3


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split our own options from the torchrun arguments that follow ``--``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-node", required=True, help="Slurm name of the node hosting the rendezvous")
    if "--" not in argv:
        parser.error("torchrun arguments must follow '--'")
    split = argv.index("--")
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def with_is_host(torchrun_argv: list[str], is_host: bool) -> list[str]:
    """Insert ``--rdzv-conf is_host=...`` before the training script, merged with any given one."""
    flag = f"is_host={int(is_host)}"
    out = list(torchrun_argv)
    for i, arg in enumerate(out):
        if arg.startswith(("--rdzv-conf=", "--rdzv_conf=")):
            out[i] = f"{arg},{flag}"
            return out
        if arg in ("--rdzv-conf", "--rdzv_conf") and i + 1 < len(out):
            out[i + 1] = f"{out[i + 1]},{flag}"
            return out
    return [f"--rdzv-conf={flag}", *out]


def requeue_requested(failures: dict) -> bool:
    """True when every failed worker exited with the requeue code (none crashed otherwise)."""
    return bool(failures) and all(f.exitcode == REQUEUE_EXIT_CODE for f in failures.values())


def main(argv: list[str] | None = None) -> int:
    """Run torchrun's agent for this node; map an all-3 worker failure to exit code 3."""
    args, torchrun_argv = parse_args(sys.argv[1:] if argv is None else argv)
    node = os.environ.get("SLURMD_NODENAME", "")
    torchrun_argv = with_is_host(torchrun_argv, is_host=(node == args.head_node))

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as parse_torchrun_args
    from torch.distributed.run import run

    try:
        run(parse_torchrun_args(torchrun_argv))
    except ChildFailedError as exc:
        if requeue_requested(exc.failures):
            print(f"torchrun_node: every failed worker on {node} exited {REQUEUE_EXIT_CODE} (requeue)", flush=True)
            return REQUEUE_EXIT_CODE
        codes = sorted({f.exitcode for f in exc.failures.values()})
        print(f"torchrun_node: workers on {node} failed with exit codes {codes}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
