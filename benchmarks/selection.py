"""Cost and fidelity of the batch-scope selection against the reference's per-micro-batch selection.

Prints two tables:

1. Time of ``select_tokens`` (exact, global, one process holding the whole step) and of the whole step plan with
   the covariance diagnostics, against a verl-style per-call selection (means, quota and top-k per micro-batch,
   per-token data copied to the host) on ~1M valid tokens, timed in turns (medians; the ratio is the median of
   each round's ratio); plus the bytes each approach moves (host copies and collective payloads per rank).
2. Overlap between the per-micro-batch selection (what the reference does on each GPU) and the exact global
   selection, on a synthetic GRPO-like batch, at ratios 2e-3 and 2e-4, for several micro-batch sizes.

    python benchmarks/selection.py [--prompts 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nemo_entropy.config import loss_config
from nemo_entropy.demo import synthetic_batch
from nemo_entropy.plan import StepInputs, build_step_plan
from nemo_entropy.selection import select_tokens


def reference_per_call(logprobs, adv, mask, ratio, micro_batch):
    """verl's KL-Cov selection, micro-batch by micro-batch (as each GPU does it)."""
    chosen = torch.zeros_like(mask)
    for lo in range(0, mask.shape[0], micro_batch):
        m = mask[lo:lo + micro_batch]
        idx = torch.nonzero(m.reshape(-1), as_tuple=True)[0]
        a = adv[lo:lo + micro_batch].reshape(-1)[idx].cpu()  # the reference copies per-token data to the host
        l = logprobs[lo:lo + micro_batch].reshape(-1)[idx].cpu()
        if len(a) == 0:
            continue
        cov = (a - a.mean()) * (l - l.mean())
        k = max(1, int(len(cov) * ratio))
        top = idx[torch.topk(cov, k).indices]
        part = torch.zeros(m.numel(), dtype=torch.bool)
        part[top] = True
        chosen[lo:lo + micro_batch] = part.reshape(m.shape)
    return chosen


def _interleaved(fns, repeats):
    """Median time of each function and median of each one's ratio to the first, timed in turns (one call of each
    per round), so that a busy machine slows every function alike instead of whichever ran during the noise."""
    for fn in fns:
        fn()  # warm-up
    rounds = []
    for _ in range(repeats):
        times = []
        for fn in fns:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rounds.append(times)
    medians = [statistics.median(r[i] for r in rounds) for i in range(len(fns))]
    ratios = [statistics.median(r[i] / r[0] for r in rounds) for i in range(len(fns))]
    return medians, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--world", type=int, default=8, help="DP ranks assumed for the bytes column")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    _, logprobs, adv, mask, uids = synthetic_batch(args.prompts, args.responses, args.max_len)
    n = int(mask.sum())
    print(f"synthetic step: {args.prompts} prompts x {args.responses} responses, {n:,} valid tokens")
    print()
    print("| ratio | selection | time (ms) | ratio to reference | host copy / step | collective payload per rank |")
    print("|---|---|---|---|---|---|")
    for ratio in (2e-3, 2e-4):
        cfg = loss_config(dict(method="kl_cov", kl_cov_ratio=ratio, covariance_diagnostics=False))
        with_diagnostics = loss_config(dict(method="kl_cov", kl_cov_ratio=ratio))
        k = max(1, int(n * ratio))
        k_diag = max(1, int(n * 0.02))
        (t_ref, t_ours, t_plan), (_, r_ours, r_plan) = _interleaved([
            lambda: reference_per_call(logprobs, adv, mask, ratio, micro_batch=4),
            lambda: select_tokens(cfg, logprobs, adv, mask, token_uids=uids, step=0),
            lambda: build_step_plan(with_diagnostics, StepInputs(logprobs, adv, mask, uids), step=0),
        ], args.repeats)
        ours_bytes = 6 * 8 + args.world * k * 16  # all-reduce of 6 int64; all-gather of k (score, uid) pairs
        # + the top 2% for concentration (from which KL-Cov's top-k is read when k <= 2%), with the diagnostics'
        # two sums and two flags per rank in the same all-gather
        plan_bytes = 6 * 8 + args.world * ((k_diag if k <= k_diag else k + k_diag) * 16 + 4 * 8)
        print(f"| {ratio:g} | reference, per micro-batch of 4 | {t_ref * 1e3:.1f} | 1.00 | {n * 8 / 2**20:.1f} MiB "
              f"| 0 (and a different answer) |")
        print(f"| {ratio:g} | ours, exact global (k={k}) | {t_ours * 1e3:.1f} | {r_ours:.2f} | 0 "
              f"| {ours_bytes / 1024:.1f} KiB (world {args.world}) |")
        print(f"| {ratio:g} | ours, the step plan with the covariance diagnostics | {t_plan * 1e3:.1f} | "
              f"{r_plan:.2f} | 0 | {plan_bytes / 1024:.1f} KiB (world {args.world}) |")
    print()
    print("Overlap of the reference's per-micro-batch selection with the exact global top-k")
    print("(fraction of the global set the reference also picks; and how many tokens it picks instead of k):")
    print()
    print("| ratio | micro-batch (sequences) | global k | reference picks | overlap with global |")
    print("|---|---|---|---|---|")
    for ratio in (2e-3, 2e-4):
        cfg = loss_config(dict(method="kl_cov", kl_cov_ratio=ratio, covariance_diagnostics=False))
        exact = select_tokens(cfg, logprobs, adv, mask, token_uids=uids, step=0)
        k = int(exact.sum())
        for micro_batch in (1, 4, 16, 64):
            ref = reference_per_call(logprobs, adv, mask, ratio, micro_batch)
            overlap = int((ref & exact).sum()) / k
            print(f"| {ratio:g} | {micro_batch} | {k} | {int(ref.sum())} | {overlap:.1%} |")


if __name__ == "__main__":
    main()
