"""The one harness for multi-process tests: spawn gloo workers on CPU, run functions, collect results.

Usage in a test module::

    def _scenario(rank, world_size, arg):      # module level, so spawned workers can import it
        ...
        return something_picklable

    results = run_distributed(4, _scenario, arg)   # list, one entry per rank

Starting processes costs seconds, so a module should batch its scenarios into one spawn with
``run_distributed_many(world_size, [(fn, args), ...])`` (results[i][rank]).
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, jobs, queue, backend="gloo"):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    results, error = [], None
    try:
        if backend == "nccl":  # one GPU per rank (the GPU tests, tests/gpu)
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        for fn, args in jobs:
            results.append(fn(rank, world_size, *args))
            dist.barrier()
    except BaseException:  # report every failure to the parent, never hang it
        error = traceback.format_exc()
    finally:
        if dist.is_initialized():
            try:
                if error is None:
                    dist.barrier()
            finally:
                dist.destroy_process_group()
    # Tensors travel as bytes: torch's shared-memory handles die with the worker process.
    buffer = io.BytesIO()
    try:
        torch.save(results, buffer)
    except Exception:
        error = (error or "") + traceback.format_exc()
        buffer = io.BytesIO()
        torch.save([], buffer)
    queue.put((rank, buffer.getvalue(), error))


def run_distributed_many(
    world_size: int, jobs: Sequence[tuple[Callable, tuple]], backend: str = "gloo"
) -> list[list[Any]]:
    """Run ``jobs`` in order inside one group of ``world_size`` processes (gloo on CPU; ``backend="nccl"``
    puts rank r on GPU r). Results must be picklable CPU objects.

    Returns ``results[job_index][rank]``. Raises with every failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, list(jobs), queue, backend)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    by_rank, errors = {}, []
    try:
        for _ in range(world_size):
            rank, payload, error = queue.get(timeout=600)
            by_rank[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            if error:
                errors.append(f"rank {rank}:\n{error}")
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed test failed\n" + "\n".join(errors))
    return [[by_rank[r][j] for r in range(world_size)] for j in range(len(jobs))]


def run_distributed(world_size: int, fn: Callable, *args) -> list[Any]:
    """Run one function on ``world_size`` gloo processes; returns one result per rank."""
    return run_distributed_many(world_size, [(fn, args)])[0]
