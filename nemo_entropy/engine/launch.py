"""Process model of the local engine (contract 3): one process, inside torchrun, or self-spawned.

* One process (``engine.nproc: 1``): train here.
* Inside a distributed launch (torchrun / srun set ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...): join the
  gloo group from the environment; the world is DP x TP with ``engine.tp_size``.
* ``engine.nproc > 1`` outside a launch: spawn that many gloo processes on this machine and wait.

Pre-emption ends every rank with :data:`REQUEUE_EXIT_CODE` (SystemExit), after the checkpoint.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Optional

import torch
import torch.multiprocessing as mp

from nemo_entropy.config import to_plain

from .preemption import REQUEUE_EXIT_CODE
from .processes import (
    broadcast_object,
    destroy_process_group,
    distributed_env_present,
    init_process_group_from_env,
    world_group,
    world_rank_and_size,
)
from .run_folder import EngineExit, RunFolderLock, check_resume_config, join_as_worker, remember_config
from .settings import EngineSettings
from .trainer import GRPOTrainer, Preempted, build_layout


def _print_outputs(result: dict[str, Any]) -> None:
    final = result.get("final") or {}
    lines = [
        f"[nemo-entropy] local run finished: {result['steps']} steps in {result['seconds']:.1f} s "
        f"(world {result['layout']['world_size']}: dp {result['layout']['dp_size']} x tp {result['layout']['tp_size']})",
    ]
    if final:
        lines.append(
            f"[nemo-entropy] last step: reward {final.get('reward_mean', float('nan')):.3f}, "
            f"entropy {final.get('entropy_mean', float('nan')):.3f}, "
            f"validation accuracy {result['val_accuracy'] if result['val_accuracy'] is not None else float('nan'):.3f}"
        )
    if result.get("pass_at_k"):
        lines.append("[nemo-entropy] pass@k:      " + ", ".join(f"{k} {v:.3f}" for k, v in result["pass_at_k"].items()))
    lines.append(f"[nemo-entropy] metrics:     {result['metrics_path']}")
    if result.get("plot_path"):
        lines.append(f"[nemo-entropy] plot:        {result['plot_path']}")
    if result.get("tensorboard_dir"):
        lines.append(f"[nemo-entropy] tensorboard: tensorboard --logdir {result['tensorboard_dir']}")
    if result.get("checkpoint_dir"):
        lines.append(f"[nemo-entropy] checkpoints: {result['checkpoint_dir']}")
    print("\n".join(lines), flush=True)


def _train_this_process(cfg_dict: dict, *, after_step=None, quiet: bool = False) -> Optional[dict]:
    """Run the trainer in this (already initialised, or single) process; rank 0 returns the result."""
    rank, world = world_rank_and_size()
    settings = EngineSettings.from_config(cfg_dict, world_size=world)
    torch.set_num_threads(settings.threads_per_process)
    layout = build_layout(settings.tp_size)
    trainer = GRPOTrainer(settings, layout, after_step=after_step)
    try:
        result = trainer.run()
    except Preempted:
        raise SystemExit(REQUEUE_EXIT_CODE)
    if rank == 0 and not quiet:
        _print_outputs(result)
    return result if rank == 0 else None


def _claim_run_folder(cfg_dict: dict) -> RunFolderLock:
    """Lock the run folder and check the config it remembers (nothing written when refused), then record the
    holder and the config; the launcher holds the returned lock for the run's life."""
    settings = EngineSettings.from_config(cfg_dict)
    lock = RunFolderLock(settings.log_dir).acquire()
    try:
        rewrite = check_resume_config(lock.folder, cfg_dict, settings.resume_allow_changes)
        lock.write_holder()
        if rewrite:
            remember_config(lock.folder, cfg_dict)
    except BaseException:
        lock.release()
        raise
    return lock


def _die_with_parent(parent_pid: int) -> None:
    """A spawned worker never outlives its launcher: SIGKILL when the parent dies (Linux ``PR_SET_PDEATHSIG``),
    else a thread that watches the parent pid."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the watch began
        os._exit(1)


def _spawned_worker(rank: int, world: int, port: int, cfg_dict: dict, queue, parent_pid: int = 0) -> None:
    if parent_pid:
        _die_with_parent(parent_pid)
        os.setpgrp()  # a terminal's Ctrl-C reaches the launcher alone, which forwards it once
        lock_fd = join_as_worker(EngineSettings.from_config(cfg_dict).log_dir)  # noqa: F841 (held until exit)
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    code = 0
    try:
        init_process_group_from_env("gloo")
        result = _train_this_process(cfg_dict, quiet=True)
        if rank == 0:
            queue.put(result)
    except SystemExit as exc:
        code = int(exc.code or 0)
    except EngineExit as exc:  # the message travels to the launcher, which prints it once
        code = exc.exit_code
        if rank == 0:
            queue.put(exc)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without waiting for peers in a barrier
        os._exit(130)
    finally:
        try:
            destroy_process_group()
        except Exception:  # a peer died: nothing left to synchronise with
            pass
    if code:
        sys.exit(code)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(cfg_dict: dict, nproc: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_spawned_worker, args=(r, nproc, port, cfg_dict, queue, os.getpid()))
             for r in range(nproc)]
    for p in procs:
        p.start()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        # Forward pre-emption signals: the workers checkpoint and exit with the requeue code.
        def _forward(signum, frame):
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signum)

        for sig in (getattr(signal, "SIGUSR1", None), signal.SIGTERM, signal.SIGINT):
            if sig is not None:
                previous[sig] = signal.signal(sig, _forward)
    result = None
    try:
        while any(p.is_alive() for p in procs) or result is None:
            try:
                result = queue.get(timeout=0.5)
            except Exception:
                if not any(p.is_alive() for p in procs):
                    break
                if any(p.exitcode not in (None, 0) for p in procs):
                    # One rank failed: the others would wait for it forever in a collective.
                    for p in procs:
                        if p.is_alive():
                            p.join(timeout=5)
                    break
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [p.exitcode for p in procs]
    if isinstance(result, EngineExit):
        raise result
    if any(c == 130 for c in codes):
        raise KeyboardInterrupt
    if any(c == REQUEUE_EXIT_CODE for c in codes):
        raise SystemExit(REQUEUE_EXIT_CODE)
    if any(c != 0 for c in codes) or result is None:
        raise RuntimeError(f"local engine: worker exit codes {codes} (rank tracebacks above)")
    return result


def run_local(cfg: Any, *, _after_step=None) -> dict:
    """Run the embedded local GRPO engine on a resolved run config (``backend: local``).

    Works in one process, inside torchrun (joins the gloo group from the environment), or spawns
    ``engine.nproc`` processes itself. Returns (on rank 0; ``{}`` on other ranks of a torchrun launch) a dict
    with ``metrics_path``, ``plot_path``, ``tensorboard_dir``, ``checkpoint_dir``, ``final`` (last step's
    metrics), ``val_accuracy``, ``steps``, ``resumed_from``, ``seconds``, ``layout``.
    Pre-emption raises ``SystemExit(REQUEUE_EXIT_CODE)`` after the checkpoint.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg_dict = dict(to_plain(cfg))
    if distributed_env_present() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_process_group_from_env("gloo")
        lock = worker_fd = None
        try:
            # Rank 0 claims the run folder; the others join once it holds it (or all stop with its reason).
            rank = world_rank_and_size()[0]
            outcome: Any = None
            if rank == 0:
                try:
                    lock = _claim_run_folder(cfg_dict)
                except EngineExit as err:
                    outcome = err
            outcome = broadcast_object(outcome, 0, world_group())
            if outcome is not None:
                raise outcome
            if rank != 0:
                worker_fd = join_as_worker(EngineSettings.from_config(cfg_dict).log_dir)
            result = _train_this_process(cfg_dict, after_step=_after_step)
        finally:
            destroy_process_group()
            if lock is not None:
                lock.release()
            if worker_fd is not None:
                os.close(worker_fd)
        return result or {}
    settings = EngineSettings.from_config(cfg_dict)
    if settings.nproc > 1 and _after_step is not None:
        raise ValueError("_after_step hooks are supported in one process only")
    lock = _claim_run_folder(cfg_dict)
    try:
        if settings.nproc > 1:
            result = _spawn(cfg_dict, settings.nproc)
            _print_outputs(result)
            return result
        return _train_this_process(cfg_dict, after_step=_after_step) or {}
    finally:
        lock.release()
