"""Each weighting control runs from its local config (a short engine run) and from a NeMo-RL config (the paper's 32B
baseline with ``loss_fn.method=<name>`` plus what the control needs, dry-run); top-entropy also end to end through the
NeMo-RL stand-in (tests/fixtures/nemo_rl_standin), where the driver's extra eval pass supplies the old entropy."""

from __future__ import annotations

import json
import math
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import torch

from nemo_entropy import train
from nemo_entropy.engine import run_local
from nemo_entropy.integrations import batch_keys
from nemo_entropy.integrations.batch_keys import plan_from_batch
from nemo_entropy.selection import token_uids_for

STANDIN = Path(__file__).resolve().parent.parent / "fixtures" / "nemo_rl_standin"
# name -> (extra dry-run overrides on grpo_32b_baseline, the control's metrics in a local run)
CONTROLS = {
    "top_entropy": ([], ("top_entropy_threshold", "top_entropy_kept_fraction")),
    "w_reinforce": ([], ("w_reinforce_positive_fraction",)),
    "gppo": ([], ("clip_ratio/low", "clip_ratio/high")),
    "entropy_advantage": (["nemo_rl.input_type=logit"],
                          ("entropy_advantage_mean", "entropy_advantage_capped_fraction")),
}


def _short(log_dir, cache_dir):
    """2 RL steps of 8 prompts x 4 samples, 2 optimizer steps each, no validation; the warm start cached per module."""
    # engine=tiny: the 2-digit addition task (short warm start); no end-of-run pass@k.
    return ["engine=tiny", "engine.pass_at_k.num_problems=0",
            f"logger.log_dir={log_dir}", f"engine.warm_start.cache_dir={cache_dir}", "grpo.max_num_steps=2",
            "grpo.num_prompts_per_step=8", "grpo.num_generations_per_prompt=4", "grpo.val_at_start=false",
            "grpo.val_at_end=false", "grpo.val_period=0", "policy.train_global_batch_size=16",
            "policy.train_micro_batch_size=8", "policy.generation_batch_size=32", "engine.progress_bar=false",
            "engine.plot=false", "checkpointing.enabled=false"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("warm_start"))


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_local_config_runs_on_the_engine(name, tmp_path, cache_dir):
    result = run_local(train.compose_config(f"local_{name}", _short(tmp_path / "run", cache_dir)))
    records = [json.loads(line) for line in open(result["metrics_path"])]
    assert [r["step"] for r in records] == [1, 2]
    info = json.load(open(tmp_path / "run" / "run_info.json"))
    assert info["loss_fn"]["method"] == name
    for record in records:
        for key in ("loss", "reward_mean", "entropy_mean", *CONTROLS[name][1]):
            assert isinstance(record[key], float) and math.isfinite(record[key]), (name, key, record.get(key))
        if name == "top_entropy":  # k = ceil(0.2 N) of a step's N valid tokens (N > 5 here)
            assert 0.2 <= record["top_entropy_kept_fraction"] < 0.4 and record["top_entropy_threshold"] > 0
        if name == "w_reinforce":
            assert 0 <= record["w_reinforce_positive_fraction"] <= 1
        if name == "entropy_advantage":  # psi = min(alpha H, |A| / kappa) >= 0
            assert record["entropy_advantage_mean"] >= 0 and 0 <= record["entropy_advantage_capped_fraction"] <= 1
        if name == "gppo":  # no dual clip: the two sides make up the clip fraction
            assert record["clip_ratio/low"] + record["clip_ratio/high"] == pytest.approx(record["clip_fraction"])


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_nemo_rl_config_dry_runs_with_the_control(name, capsys):
    argv = ["--config-name", "grpo_32b_baseline", "--dry-run", f"loss_fn.method={name}", *CONTROLS[name][0]]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert f"# loss: method={name} " in out and f"method: {name}" in out


# ----------------------------------------------------------------------------------------------- NeMo-RL stand-in
def _drop_nemo_rl_modules():
    for module in [m for m in sys.modules if m == "nemo_rl" or m.startswith("nemo_rl.")]:
        del sys.modules[module]


def test_top_entropy_end_to_end_through_the_nemo_rl_standin(tmp_path, monkeypatch):
    """One GRPO step of 16 samples, 2 optimizer steps of 8 on 2 simulated DP ranks: the driver's eval pass computes
    the old entropy (the stand-in's bigram model), the plan keeps each step's top 25%, and the loss calls receive
    exactly those tokens, however NeMo-RL sharded and micro-batched them."""
    monkeypatch.setenv("NEMO_RL_STANDIN_GENERATION", "main")
    monkeypatch.syspath_prepend(str(STANDIN))
    _drop_nemo_rl_modules()
    try:
        from nemo_rl.algorithms.grpo import MasterConfig, rollout_batch
        from nemo_rl.models.policy import lm_policy

        lm_policy.CALLS.clear()
        argv = ["--config-name", "grpo_32b_baseline", "cluster.num_nodes=1", "cluster.gpus_per_node=2",
                "policy.megatron_cfg.tensor_model_parallel_size=1", "policy.megatron_cfg.sequence_parallel=false",
                "grpo.num_prompts_per_step=4", "grpo.num_generations_per_prompt=4", "grpo.max_num_steps=1",
                "policy.train_global_batch_size=8", "policy.train_micro_batch_size=2", f"nemo_rl.root={STANDIN}",
                "nemo_rl.base_config=examples/configs/base.yaml", "checkpointing.enabled=false",
                f"logger.log_dir={tmp_path / 'run'}", "loss_fn.method=top_entropy",
                "++loss_fn.top_entropy_quantile=0.25"]
        assert train.main(argv) == 0
        probe = [c for c in lm_policy.CALLS if "entropy_plan.step" not in c["data"]]
        trained = [c for c in lm_policy.CALLS if "entropy_plan.step" in c["data"]]
        assert probe and len(trained) == 8  # the eval pass, then 2 steps x 2 ranks x 2 micro-batches

        master = MasterConfig(policy={}, loss_fn={}, grpo={"num_prompts_per_step": 4, "num_generations_per_prompt": 4},
                              data={"sequence_length": 12}, checkpointing={}, cluster={})
        batch = rollout_batch(0, master)
        logp = torch.log_softmax(lm_policy.bigram_logits(batch["input_ids"]).double(), -1)[:, :-1]
        entropy = (-(logp.exp() * logp).sum(-1)).float()
        uids = token_uids_for(torch.arange(16), 12)[:, 1:]
        mask = (batch["token_mask"][:, 1:] * batch["sample_mask"][:, None]) != 0
        received: dict[int, set[int]] = {}
        for call in trained:
            data = call["data"]
            kept = plan_from_batch(data, global_valid_tokens=1, global_valid_seqs=1).values["top_entropy"]["kept"]
            received.setdefault(int(data[batch_keys.STEP][0]), set()).update(
                data[batch_keys.TOKEN_UIDS][:, 1:][kept].tolist())
        for step, rows in enumerate((slice(0, 8), slice(8, 16))):
            order = sorted((-float(entropy[rows][i, j]), int(uids[rows][i, j])) for i, j in mask[rows].nonzero().tolist())
            num, den = Decimal("0.25").as_integer_ratio()
            want = {uid for _, uid in order[: -(-num * len(order) // den)]}
            assert received[step] == want, step
    finally:
        _drop_nemo_rl_modules()


# ----------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides,names", [
    (["loss_fn.method=entropy_advantage"], ["['entropy_advantage']", "nemo_rl.input_type=logit", "'logprob'"]),
    (["loss_fn.method=top_entropy", "policy.megatron_cfg.context_parallel_size=2"],
     ["['top_entropy']", "policy.megatron_cfg.context_parallel_size=2"]),
    (["loss_fn.method=gppo", "++loss_fn.controls=[entropy_advantage]", "nemo_rl.input_type=logit",
      "policy.megatron_cfg.context_parallel_size=2"], ["['entropy_advantage']", "context_parallel_size=2"]),
    (["loss_fn.method=top_entropy", "nemo_rl.plan=worker", "policy.sequence_packing.enabled=false"],
     ["nemo_rl.plan='worker'", "['top_entropy']"]),
])
def test_entropy_reading_controls_without_their_input_are_refused_at_dry_run(overrides, names, capsys):
    """Refused before Ray starts, naming the control and the key: the LOGPROB input has no current entropy, a
    context-parallel rank no whole sequence, an in-worker plan no old entropy of the whole step."""
    assert train.main(["--config-name", "grpo_32b_baseline", "--dry-run", *overrides]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in names), err


def test_a_control_without_entropy_needs_no_logits_and_accepts_context_parallelism(capsys):
    argv = ["--config-name", "grpo_32b_baseline", "--dry-run", "loss_fn.method=w_reinforce",
            "policy.megatron_cfg.context_parallel_size=2"]
    assert train.main(argv) == 0
    assert "CP 2" in capsys.readouterr().out
