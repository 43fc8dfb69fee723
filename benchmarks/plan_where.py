"""What in-worker planning (``nemo_rl.plan: worker``) saves against the driver plan (``plan: driver``, the default).

The driver plan builds every optimizer step's plan on the driver (one process, CPU, the whole step) and attaches it
to ``train_data``; the worker mode attaches only token uids and steps, and each DP rank plans its own share inside
the loss (collectives over DP). Per rollout this prints:

* the driver's time in ``attach_step_plans`` (with the plans against uids and steps only), and what one worker
  spends planning its 1/DP share of each step (CPU here; a GPU is faster);
* the bytes each mode adds to ``train_data`` (what Ray moves to the workers), against the bytes NeMo-RL moves
  anyway (input ids, masks, three log-prob tensors, advantages).

    OMP_NUM_THREADS=1 python benchmarks/plan_where.py [--prompts 64] [--responses 8] [--max-len 4096] [--gbs 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nemo_entropy.config import loss_config
from nemo_entropy.demo import synthetic_batch
from nemo_entropy.integrations.megatron import plan_in_worker
from nemo_entropy.integrations.step_plan import attach_step_plans
from nemo_entropy.parallel import ParallelGroups


def nemo_rl_batch(prompts: int, responses: int, max_len: int) -> dict[str, torch.Tensor]:
    """A NeMo-RL-shaped ``train_data`` with the keys NeMo-RL ships to the workers for GRPO anyway."""
    _, logprobs, adv, mask, _ = synthetic_batch(prompts, responses, max_len)
    batch, length = mask.shape
    pad = lambda t, value=0.0: torch.cat([torch.full((batch, 1), value, dtype=t.dtype), t], 1)  # noqa: E731
    return {
        "input_ids": torch.randint(0, 150_000, (batch, length + 1)),
        "input_lengths": mask.sum(1) + 1,
        "token_mask": pad(mask.float()),
        "sample_mask": torch.ones(batch),
        "prev_logprobs": pad(logprobs),
        "generation_logprobs": pad(logprobs),
        "reference_policy_logprobs": pad(logprobs),
        "advantages": pad(adv),
    }


def nbytes(data, keys) -> int:
    return sum(data[k].numel() * data[k].element_size() for k in keys)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--gbs", type=int, default=128, help="policy.train_global_batch_size (samples per step)")
    parser.add_argument("--dp", type=int, default=8, help="DP ranks: the share one worker plans")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = nemo_rl_batch(args.prompts, args.responses, args.max_len)
    batch, length = base["token_mask"].shape
    steps = batch // args.gbs
    print(f"rollout: {batch} samples x {length} positions, {int(base['token_mask'].sum()):,} valid tokens, "
          f"{steps} optimizer steps of {args.gbs} samples, DP {args.dp}")
    print()
    print("| loss_fn | driver: attach (plans) | worker: attach (uids, steps) | ratio | one worker plans its share "
          "of each step | bytes added: driver | bytes added: worker | NeMo-RL's own train_data |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg in ({"method": "kl_cov", "kl_cov_ratio": 2e-3}, {"method": "kl_cov", "kl_cov_ratio": 2e-3,
                                                            "covariance_diagnostics": False}):
        config = loss_config(cfg)
        added = {}

        def attach(plans):
            data = dict(base)
            attach_step_plans(data, config, train_global_batch_size=args.gbs, first_step=0, attach_plans=plans)
            added[plans] = nbytes(data, [k for k in data if k not in base])
            return data

        t_driver = timed(lambda: attach(True), args.repeats)
        t_worker = timed(lambda: attach(False), args.repeats)
        shared = attach(False)
        share = args.gbs // args.dp  # one DP rank's samples of one step
        local = {k: v[:share] for k, v in shared.items()}
        t_share = timed(lambda: plan_in_worker(config, local, groups=ParallelGroups.single()), args.repeats)
        name = ", ".join(f"{k}={v}" for k, v in cfg.items())
        own = nbytes(base, base)
        print(f"| {name} | {t_driver * 1e3:.0f} ms | {t_worker * 1e3:.0f} ms | {t_driver / t_worker:.0f}x | "
              f"{t_share * 1e3:.0f} ms x {steps} steps | {added[True] / 2**20:.0f} MiB ({added[True] / own:.0%}) | "
              f"{added[False] / 2**20:.0f} MiB ({added[False] / own:.0%}) | {own / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
