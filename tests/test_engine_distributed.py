"""Layout invariance of the local engine: 2 DP x 2 TP gloo processes (vocab-parallel head, batch-scope
KL-Cov selection across DP) give the metrics and weights of one process, within fp32 rounding; on the
countdown task (variable-length responses, KV-cache generation that stops when every row has ended, pass@k
split over DP ranks) 2 DP processes give those of one process."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from nemo_entropy.engine import run_local
from nemo_entropy.train import compose_config

from .test_engine import TIMING_KEYS, read, tiny_overrides

# Values that are sums of per-token fp32 terms in a different order (micro-batch split, DP all-reduce,
# vocab shards) agree to fp32 rounding amplified by the two Adam steps of one rollout; counts and rewards agree
# exactly. One rollout only: later rollouts sample from weights that already differ in the last bits, and how
# soon a near-tie flips a sampled token depends on the CPU's vector unit (torch picks AVX-512 / AVX2 / default
# kernels per machine), after which two correct runs follow different trajectories.
EXACT_KEYS = {"reward_mean", "zero_advantage_group_fraction", "response_length_mean", "truncated_fraction",
              "selected_fraction", "selected_tokens", "optimizer_steps", "lr", "val_accuracy", "reward_mean_trained",
              "dynamic_sampling_num_gen_batches", "dynamic_sampling_num_discarded_valid_samples",
}


def _full_weights(checkpoint_dir, step, tp_size):
    path = os.path.join(checkpoint_dir, f"step_{step:07d}")
    shards = [torch.load(os.path.join(path, f"rank_{r:05d}.pt"), weights_only=False)["model"] for r in range(tp_size)]
    weights = {k: v for k, v in shards[0].items() if k != "lm_head_shard"}
    weights["lm_head"] = torch.cat([s["lm_head_shard"] for s in shards])
    return weights


@pytest.mark.timeout(300)
@pytest.mark.parametrize("task, nproc, tp, extra", [
    ("addition", 4, 2, []),
    ("countdown", 2, 1, []),                                             # 2 passes over the rollout (countdown.yaml)
    # NeMo-RL's dynamic sampling: generation split over DP, the kept groups the same whatever the layout
    ("countdown", 2, 1, ["grpo.use_dynamic_sampling=true", "grpo.batch_multiplier=1.5"]),
])
def test_dp_by_tp_processes_match_one_process(tmp_path, task, nproc, tp, extra):
    cache = str(tmp_path / "warm")
    steps = 1  # the warm start's validation, one rollout, its optimizer steps, pass@k after them
    single = run_local(compose_config("local_kl_cov", tiny_overrides(tmp_path / "one", cache, steps=steps, task=task,
                                                                     extra=extra)))
    multi = run_local(compose_config("local_kl_cov", tiny_overrides(
        tmp_path / "four", cache, steps=steps, task=task,
        extra=[*extra, f"engine.nproc={nproc}", f"engine.tp_size={tp}"])))
    assert multi["layout"] == {"world_size": nproc, "dp_size": nproc // tp, "tp_size": tp}
    one, four = read(single["metrics_path"]), read(multi["metrics_path"])
    assert [r["step"] for r in one] == [r["step"] for r in four] == list(range(steps + 1))
    for a, b in zip(one, four):
        assert set(a) == set(b)
        for key in a:
            if key in TIMING_KEYS or a[key] is None:
                continue
            if key in EXACT_KEYS or key.startswith("pass@"):
                assert a[key] == b[key], (a["step"], key, a[key], b[key])
            else:
                assert math.isclose(a[key], b[key], rel_tol=2e-4, abs_tol=2e-5), (a["step"], key, a[key], b[key])
    assert four[1]["selected_tokens"] >= 2                 # KL-Cov selected tokens in both optimizer steps
    assert multi["pass_at_k"] == single["pass_at_k"] and "pass@8" in multi["pass_at_k"]
    assert all(0 < r["reward_mean"] < 1 for r in one[1:])  # some samples right, some wrong: non-zero advantages
    # The weights after the rollout's 2 optimizer steps: body replicated over TP, head split by vocabulary.
    w1 = _full_weights(single["checkpoint_dir"], steps, 1)
    w4 = _full_weights(multi["checkpoint_dir"], steps, tp)
    vocab = w1["lm_head"].shape[0]
    padded = -(-vocab // tp) * tp                          # addition: 15 -> 16 over 2 TP ranks
    assert w4["lm_head"].shape[0] == padded and torch.all(w4["lm_head"][vocab:] == 0)
    w4["lm_head"] = w4["lm_head"][:vocab]
    for key in w1:
        torch.testing.assert_close(w4[key], w1[key], rtol=1e-4, atol=1e-5, msg=key)
    info = json.load(open(tmp_path / "four" / "run_info.json"))
    assert sorted(r["rank"] for r in info["ranks"]) == list(range(nproc))
    assert {(r["dp_rank"], r["tp_rank"]) for r in info["ranks"]} == {(d, t) for d in range(nproc // tp) for t in range(tp)}
