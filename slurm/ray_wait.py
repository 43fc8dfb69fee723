"""Wait until a Ray cluster has a given number of live nodes, then run a command in their place.

``slurm/launch.sh`` runs the NeMo-RL driver through this on the head node::

    python slurm/ray_wait.py --address HEAD:6379 --nodes 4 --timeout 600 -- python -m nemo_entropy.train ...

Exits 1 with the number of nodes seen when the deadline passes, so a worker that never joined
fails the job in minutes instead of the trainer hanging on a placement group.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split our options from the command after ``--``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="Ray GCS address, host:port")
    parser.add_argument("--nodes", type=int, required=True, help="live nodes to wait for")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    if "--" not in argv:
        parser.error("the command to run must follow '--'")
    split = argv.index("--")
    return parser.parse_args(argv[:split]), argv[split + 1 :]


def live_nodes(address: str) -> int:
    """Number of alive nodes the Ray GCS at ``address`` knows (0 while it is unreachable)."""
    import ray

    try:
        if not ray.is_initialized():
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        return sum(1 for node in ray.nodes() if node.get("Alive"))
    except Exception:  # GCS not up yet: Ray raises ConnectionError and friends
        ray.shutdown()
        return 0


def main(argv: list[str] | None = None) -> int:
    """Poll until ``--nodes`` are alive or ``--timeout`` passes; then exec the command."""
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    if not command:
        print("ray_wait: no command to run after '--'", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.timeout
    seen = 0
    while True:
        seen = live_nodes(args.address)
        print(f"ray_wait: {seen}/{args.nodes} node(s) joined {args.address}", flush=True)
        if seen >= args.nodes:
            break
        if time.monotonic() > deadline:
            print(
                f"ray_wait: only {seen}/{args.nodes} node(s) joined the Ray cluster at {args.address} "
                f"after {args.timeout:.0f}s: see the ray-worker-*.log files",
                file=sys.stderr,
                flush=True,
            )
            return 1
        time.sleep(5)
    import ray

    ray.shutdown()
    os.execvp(command[0], command)
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())
