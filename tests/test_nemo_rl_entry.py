"""The NeMo-RL run entry against a stand-in of NeMo-RL's modules (tests/fixtures/nemo_rl_standin, both generations).

NeMo-RL is not installable in CI; the stand-in models the interfaces the entry relies on (pydantic
``MasterConfig`` and dataclass ``GRPOSaveState`` of main, the dict forms of v0.6, the async and data-plane
entries). The same entry is run against the real NeMo-RL by tests/nemo_rl_real (``make test-nemo-rl``).

Each defect of issue 9 has a test here that failed before the fix:
1. ``MasterConfig`` read by attribute (``'MasterConfig' object is not subscriptable``);
2. the optimizer-step counter after a resume continues from ``total_steps`` (it restarted at 0), so Clip-Cov
   selects what an uninterrupted run selects;
3. ``async_grpo_train`` gets the wrapped policy (counter ``current_step``); the data plane is refused by name;
4. LOGIT input, TP = 1, CP = 2: the TP group reaches NeMo-RL's log-prob helper (its CP-aware branch);
5. in-worker selection with packing or dynamic batching is refused naming both keys;
6. LOGIT input with fused linear log-probs or top-k/top-p is refused by name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_entropy import train
from nemo_entropy.config import loss_config
from nemo_entropy.integrations import StepPlanPolicy, EntropyControlLossFn, batch_keys
from nemo_entropy.integrations.nemo_rl_run import check_nemo_rl_run_config, install, save_state_counter
from nemo_entropy.integrations.batch_keys import plan_from_batch
from nemo_entropy.selection import select_tokens, token_uids_for
from tests.support.distributed import run_distributed

STANDIN = Path(__file__).resolve().parent / "fixtures" / "nemo_rl_standin"
CONF = Path(__file__).resolve().parent.parent / "conf"
REPO = Path(__file__).resolve().parent.parent
SMALL = [  # a 2-GPU layout and a small rollout: 16 samples, 2 optimizer steps of 8, DP 2 x micro-batch 2
    "cluster.num_nodes=1", "cluster.gpus_per_node=2", "policy.megatron_cfg.tensor_model_parallel_size=1",
    "policy.megatron_cfg.sequence_parallel=false",
    "grpo.num_prompts_per_step=4", "grpo.num_generations_per_prompt=4", "policy.train_global_batch_size=8",
    "policy.train_micro_batch_size=2", f"nemo_rl.root={STANDIN}", "nemo_rl.base_config=examples/configs/base.yaml",
    "checkpointing.enabled=true", "checkpointing.save_period=1",
]
CLIP_COV = ["loss_fn.clip_cov_ratio=0.05", "loss_fn.clip_cov_lb=0.0"]


def _drop_nemo_rl_modules():
    for name in [m for m in sys.modules if m == "nemo_rl" or m.startswith("nemo_rl.")]:
        del sys.modules[name]


def _clear_nemo_rl_resolvers():
    """A fresh process has none of NeMo-RL's OmegaConf resolvers until its code registers them."""
    from omegaconf import OmegaConf

    for name in ("add", "mul", "div", "max"):
        if OmegaConf.has_resolver(name):
            OmegaConf.clear_resolver(name)


@pytest.fixture(params=["main", "v0.6"])
def standin(request, monkeypatch):
    """The stand-in NeMo-RL of one generation on sys.path; yields the recorded loss calls."""
    monkeypatch.setenv("NEMO_RL_STANDIN_GENERATION", request.param)
    monkeypatch.syspath_prepend(str(STANDIN))
    _drop_nemo_rl_modules()
    _clear_nemo_rl_resolvers()
    from nemo_rl.models.policy import lm_policy

    lm_policy.CALLS.clear()
    yield request.param, lm_policy.CALLS
    _drop_nemo_rl_modules()


def _run(tmp_path, config="grpo_7b_clip_cov", extra=(), name="run"):
    argv = ["--config-name", config, *SMALL, *extra, f"logger.log_dir={tmp_path / name}",
            f"checkpointing.checkpoint_dir={tmp_path / name / 'ckpt'}"]
    return train.main(argv)


def _selected_uids_by_step(calls) -> dict[int, set[int]]:
    """Optimizer step -> uids of the tokens the loss received as selected (over every rank and micro-batch)."""
    out: dict[int, set[int]] = {}
    for call in calls:
        data = call["data"]
        step = int(data[batch_keys.STEP][0])
        selected = plan_from_batch(data, global_valid_tokens=1, global_valid_seqs=1).selected
        chosen = data[batch_keys.TOKEN_UIDS][:, 1:][selected]
        out.setdefault(step, set()).update(chosen.tolist())
    return out


def _direct_selection(cfg, grpo_step: int, first_opt_step: int, master) -> dict[int, set[int]]:
    """select_tokens over each optimizer step of the stand-in's batch of GRPO step ``grpo_step``, independently."""
    from nemo_rl.algorithms.grpo import rollout_batch

    batch = rollout_batch(grpo_step, master)
    size, length = batch["token_mask"].shape
    uids = token_uids_for(torch.arange(size), length)
    out = {}
    for j, start in enumerate(range(0, size, 8)):
        rows = slice(start, start + 8)
        mask = (batch["token_mask"][rows, 1:] * batch["sample_mask"][rows, None]) != 0
        picked = select_tokens(cfg, batch["prev_logprobs"][rows, 1:], batch["advantages"][rows, 1:], mask,
                               token_uids=uids[rows, 1:].contiguous(), step=first_opt_step + j)
        out[first_opt_step + j] = set(uids[rows, 1:][picked].tolist())
    return out


# ----------------------------------------------------------------------------------------------- defects 1-2
def test_run_entry_trains_through_nemo_rl_with_the_exact_selection(standin, tmp_path):
    generation, calls = standin
    assert _run(tmp_path, extra=[*CLIP_COV, "grpo.max_num_steps=3"]) == 0  # defect 1: MasterConfig by attribute
    import nemo_rl.algorithms.grpo as grpo

    assert grpo.ClippedPGLossFn.func is EntropyControlLossFn
    cfg = loss_config({"method": "clip_cov", "clip_cov_ratio": 0.05, "clip_cov_lb": 0.0, "ratio_clip_min": 1.0,
                       "ratio_clip_max": 1.0})
    master = {"grpo": {"num_prompts_per_step": 4, "num_generations_per_prompt": 4}, "data": {"sequence_length": 12}}
    if generation == "main":
        master = grpo.MasterConfig(policy={}, loss_fn={}, grpo=master["grpo"], data=master["data"],
                                   checkpointing={}, cluster={})
    received = _selected_uids_by_step(calls)
    assert sorted(received) == list(range(6))  # 3 GRPO steps x 2 optimizer steps, counted from 0
    for grpo_step in range(3):
        for step, uids in _direct_selection(cfg, grpo_step, 2 * grpo_step, master).items():
            assert uids and received[step] == uids, (generation, step)
    assert all(c["metrics"]["selected_fraction"] >= 0 for c in calls)


def test_resume_continues_the_optimizer_step_and_selects_like_an_uninterrupted_run(standin, tmp_path):
    generation, calls = standin
    # 5 GRPO steps of 2 optimizer steps; epochs of 2 GRPO steps, so current_step != total_steps after step 2.
    assert _run(tmp_path, extra=[*CLIP_COV, "grpo.max_num_steps=5", "grpo.max_num_epochs=10"], name="whole") == 0
    whole = _selected_uids_by_step(calls)
    calls.clear()
    assert _run(tmp_path, extra=[*CLIP_COV, "grpo.max_num_steps=3", "grpo.max_num_epochs=10"], name="resumed") == 0
    calls.clear()
    assert _run(tmp_path, extra=[*CLIP_COV, "grpo.max_num_steps=5", "grpo.max_num_epochs=10"], name="resumed") == 0
    resumed = _selected_uids_by_step(calls)
    assert sorted(resumed) == [6, 7, 8, 9]  # total_steps 3 x 2 optimizer steps per rollout (current_step is 1)
    assert all(resumed[s] == whole[s] for s in resumed)


def test_save_state_counter_reads_both_generations_and_names_a_missing_field():
    from dataclasses import dataclass

    @dataclass
    class State:
        current_step: int
        total_steps: int

    assert save_state_counter(State(1, 7), "total_steps") == 7
    assert save_state_counter({"current_step": 1, "total_steps": 7}, "current_step") == 1
    assert save_state_counter(None, "total_steps") == 0
    with pytest.raises(TypeError, match="no field 'total_steps'"):
        save_state_counter({"current_step": 2}, "total_steps")


# ----------------------------------------------------------------------------------------------- defect 3
def test_async_entry_gets_the_wrapped_policy_counting_current_step(standin, tmp_path):
    generation, calls = standin
    extra = [*CLIP_COV, "grpo.max_num_steps=2", "++grpo.async_grpo.enabled=true"]
    assert _run(tmp_path, extra=extra, name="async") == 0
    assert sorted(_selected_uids_by_step(calls)) == [0, 1, 2, 3]
    calls.clear()
    assert _run(tmp_path, extra=[*CLIP_COV, "grpo.max_num_steps=3", "++grpo.async_grpo.enabled=true"],
                name="async") == 0
    assert sorted(_selected_uids_by_step(calls)) == [4, 5]  # resumed at current_step 2


def test_data_plane_is_refused_before_training_naming_the_key(standin, tmp_path, capsys):
    generation, calls = standin
    assert _run(tmp_path, extra=["++data_plane.enabled=true", "grpo.max_num_steps=1"]) == 2
    assert "data_plane.enabled=true" in capsys.readouterr().err
    assert calls == []  # nothing trained


def test_a_base_config_that_turns_on_the_data_plane_is_refused_after_the_merge(standin, tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text((STANDIN / "examples/configs/base.yaml").read_text() + "data_plane:\n  enabled: true\n")
    assert _run(tmp_path, extra=[f"nemo_rl.base_config={base}", "grpo.max_num_steps=1"]) == 2
    assert "data_plane.enabled=true" in capsys.readouterr().err


def test_install_wraps_every_entry_the_module_has_and_is_idempotent(standin):
    import nemo_rl.algorithms.grpo as grpo

    original = grpo.grpo_train
    assert install(grpo) == ["grpo_train", "async_grpo_train"]
    wrapped = grpo.grpo_train
    assert wrapped is not original and install(grpo) == ["grpo_train", "async_grpo_train"]
    assert grpo.grpo_train is wrapped  # not wrapped twice


# ----------------------------------------------------------------------------------------------- defect 4
def _cp_logit_scenario(rank, world_size, standin_path):
    os.environ["NEMO_RL_STANDIN_GENERATION"] = "main"
    sys.path.insert(0, standin_path)
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=2)
    gen = torch.Generator().manual_seed(5)
    batch, length, vocab = 3, 8, 13
    logits = torch.randn(batch, length, vocab, generator=gen)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.ones(batch, length)
    mask[:, 0] = 0
    full_lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    data = {"input_ids": ids, "token_mask": mask, "sample_mask": torch.ones(batch),
            "advantages": torch.randn(batch, 1, generator=gen).expand(batch, length).clone(),
            "prev_logprobs": torch.cat([torch.zeros(batch, 1), full_lp], 1)}
    fn = EntropyControlLossFn({"method": "ppo", "reference_policy_kl_penalty": 0.0}, input_type="logit")
    chunk = length // 2
    local = logits[:, rank * chunk : (rank + 1) * chunk].clone().requires_grad_(True)
    gvt = mask[:, 1:].sum()
    loss, metrics = fn(data=data, global_valid_seqs=torch.tensor(3.0), global_valid_toks=gvt, logits=local)
    ps.destroy_model_parallel()
    # the ratio is exactly 1 only if the CP-gathered log-probs equal the unsharded ones
    return float(loss), metrics["probs_ratio_min"], metrics["probs_ratio_max"]


def test_logit_input_with_context_parallelism_and_tp_1_uses_the_cp_aware_path():
    results = run_distributed(2, _cp_logit_scenario, str(STANDIN))
    for _, ratio_min, ratio_max in results:
        assert abs(ratio_min - 1.0) < 1e-6 and abs(ratio_max - 1.0) < 1e-6
    assert results[0][0] == pytest.approx(results[1][0])


# ----------------------------------------------------------------------------------------------- defects 5-6
@pytest.mark.parametrize("overrides,names", [
    (["nemo_rl.plan=worker"], ["nemo_rl.plan='worker'", "policy.sequence_packing.enabled=true"]),
    (["nemo_rl.plan=worker", "policy.sequence_packing.enabled=false", "++policy.dynamic_batching.enabled=true"],
     ["nemo_rl.plan='worker'", "policy.dynamic_batching.enabled=true"]),
    (["nemo_rl.plan=worker", "policy.sequence_packing.enabled=false"],
     ["nemo_rl.plan='worker'", "policy.train_micro_batch_size x DP == policy.train_global_batch_size"]),
    (["nemo_rl.input_type=logit", "++policy.megatron_cfg.use_fused_linear_logprobs=true"],
     ["nemo_rl.input_type='logit'", "policy.megatron_cfg.use_fused_linear_logprobs=true"]),
    (["nemo_rl.input_type=logit", "++policy.generation.top_k=50"], ["nemo_rl.input_type='logit'", "top_k=50"]),
    (["nemo_rl.input_type=logit", "policy.generation.top_p=0.9"], ["nemo_rl.input_type='logit'", "top_p=0.9"]),
])
def test_combinations_the_plugin_cannot_serve_are_refused_naming_both_keys(overrides, names, capsys):
    assert train.main(["--config-name", "grpo_32b_kl_cov", "--dry-run", *overrides]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in names), err


def test_worker_selection_without_packing_and_one_micro_batch_per_step_is_accepted():
    policy = {"sequence_packing": {"enabled": False}, "train_global_batch_size": 8, "train_micro_batch_size": 4,
              "megatron_cfg": {"enabled": True}}
    check_nemo_rl_run_config({"policy": policy}, {"plan": "worker"}, data_parallel_size=2)
    # The DTensor backend gives the loss no DP group: each rank would select over its own share only.
    with pytest.raises(ValueError, match=r"nemo_rl.plan='worker' needs the Megatron backend"):
        check_nemo_rl_run_config({"policy": {**policy, "megatron_cfg": {"enabled": False}}}, {"plan": "worker"},
                                 data_parallel_size=2)
    # The key's old name still works, with a warning, and means the same.
    with pytest.warns(FutureWarning, match="nemo_rl.selection is deprecated"), \
            pytest.raises(ValueError, match=r"nemo_rl.plan='worker' needs the Megatron backend"):
        check_nemo_rl_run_config({"policy": {**policy, "megatron_cfg": {"enabled": False}}},
                                 {"selection": "worker"}, data_parallel_size=2)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="disagree"):
        check_nemo_rl_run_config({"policy": policy}, {"selection": "worker", "plan": "driver"})


def test_the_logit_adapter_refuses_fused_linear_logprobs():
    with pytest.raises(ValueError, match="use_fused_linear_logprobs"):
        EntropyControlLossFn({"method": "ppo"}, use_fused_linear_logprobs=True, input_type="logit")


def test_wrapped_entry_checks_the_master_config_it_receives(standin):
    """A user's own script (install, then grpo_train) is checked on the master config NeMo-RL hands over."""
    import nemo_rl.algorithms.grpo as grpo

    install(grpo, {"input_type": "logit"})
    loss_fn = grpo.ClippedPGLossFn({"method": "ppo"})
    master = {"policy": {"generation": {"top_k": 20}, "train_global_batch_size": 8},
              "grpo": {"num_prompts_per_step": 2, "num_generations_per_prompt": 4}}
    with pytest.raises(ValueError, match="top_k=20"):
        grpo.grpo_train(None, None, None, None, None, loss_fn, {}, {}, None, None, None, master)


def test_wrapped_policy_is_a_batch_selection_policy_reading_train_global_batch_size(standin):
    import nemo_rl.algorithms.grpo as grpo

    seen = {}
    grpo.grpo_train = lambda policy, policy_generation, wrapped_dataloader, val_dataloader, tokenizer, loss_fn, \
        task_to_env, val_task_to_env, logger, checkpointer, grpo_save_state, master_config, processor=None: \
        seen.update(policy=policy)
    install(grpo)
    master = {"policy": {"train_global_batch_size": 8}, "grpo": {"num_prompts_per_step": 4,
                                                                 "num_generations_per_prompt": 4}}
    state = {"current_step": 1, "total_steps": 3}
    grpo.grpo_train("policy", None, None, None, None, grpo.ClippedPGLossFn({"method": "kl_cov"}), {}, {}, None,
                    None, state, master)
    assert isinstance(seen["policy"], StepPlanPolicy) and seen["policy"].optimizer_step == 6


# ----------------------------------------------------------------------------------------------- preflight
def _preflight(path: Path, generation: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{REPO}", "NEMO_RL_STANDIN_GENERATION": generation}
    env.pop("NEMO_RL_ROOT", None)
    return subprocess.run([sys.executable, "-m", "nemo_entropy.cli", "check-nemo-rl", *args], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("generation", ["main", "v0.6"])
def test_preflight_passes_on_both_generations(generation):
    out = _preflight(STANDIN, generation)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "compatible" in out.stdout and "+standin" in out.stdout
    assert ("pydantic model" if generation == "main" else "TypedDict") in out.stdout


@pytest.mark.parametrize("edit,named", [
    (("algorithms/grpo.py", "val_task_to_env, logger, checkpointer, grpo_save_state, master_config, processor=None",
      "val_task_to_env, logger, checkpointer, save_state, master_config, processor=None"), "grpo_save_state"),
    (("algorithms/grpo.py", "        total_steps: int\n        total_valid_tokens: int\n        val_reward",
      "        total_valid_tokens: int\n        val_reward"), "total_steps"),
    (("distributed/batched_data_dict.py", "out.append(self.select_indices(torch.tensor(rows)))",
      "out.append(BatchedDataDict({k: v[torch.tensor(rows)] for k, v in self.items() if not k.startswith('entropy')}))"),
     "extra per-sample key"),
    (("algorithms/loss/loss_functions.py", "per_token = torch.maximum(-adv * ratio, -adv * clamped)",
      "per_token = -adv * clamped"), "NeMo-RL's loss changed meaning"),
])
def test_preflight_names_an_interface_changed_by_hand(tmp_path, edit, named):
    copy = tmp_path / "nemo-rl"
    shutil.copytree(STANDIN, copy)
    path, old, new = edit
    target = copy / "nemo_rl" / path
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new))
    out = _preflight(copy, "main")
    assert out.returncode == 1 and "INCOMPATIBLE" in out.stderr and named in out.stderr, out.stdout + out.stderr


STANDIN_RUN = ["nemo_rl.base_config=examples/configs/base.yaml"]  # the stand-in's base config (has ${mul:...})


def test_preflight_on_the_users_config_composes_merges_and_resolves_it_like_the_entry():
    out = _preflight(STANDIN, "main", "--config-name", "grpo_32b_kl_cov", *STANDIN_RUN)
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("ok    run config"))
    assert "grpo_32b_kl_cov merged onto examples/configs/base.yaml" in line and "TP 8 x PP 1 x CP 1 x DP 4" in line
    assert "12 checks passed" in out.stdout


@pytest.mark.parametrize("edit,named", [
    # NeMo-RL without the resolvers its base config uses: the run entry could not resolve the merged config
    (("utils/config.py", "def register_omegaconf_resolvers():", "def _renamed_register_omegaconf_resolvers():"),
     ["run config", "${mul:...}", "nemo_rl.utils.config.register_omegaconf_resolvers"]),
    # ... or without the loader the entry reads NeMo-RL's base config with
    (("utils/config.py", "def load_config(path):", "def _renamed_load_config(path):"),
     ["run config", "nemo_rl.utils.config.load_config"]),
])
def test_preflight_on_the_users_config_names_a_missing_resolver_or_loader(tmp_path, edit, named):
    copy = tmp_path / "nemo-rl"
    shutil.copytree(STANDIN, copy)
    path, old, new = edit
    target = copy / "nemo_rl" / path
    assert old in target.read_text()
    target.write_text(target.read_text().replace(old, new))
    out = _preflight(copy, "main", "--config-name", "grpo_32b_kl_cov", *STANDIN_RUN)
    assert out.returncode == 1, out.stdout + out.stderr
    (failure,) = [x for x in out.stderr.splitlines() if "INCOMPATIBLE" in x]
    assert failure.startswith(f"check-nemo-rl: INCOMPATIBLE ({named[0]}): config 'grpo_32b_kl_cov'"), failure
    for word in named[1:]:
        assert word in failure, failure


def test_preflight_on_the_users_config_names_an_unknown_dataset():
    out = _preflight(STANDIN, "main", "--config-name", "grpo_7b_kl_cov", *STANDIN_RUN,
                     "data.train.dataset_name=DAPOMath17k")
    assert out.returncode == 1, out.stdout + out.stderr
    assert ("INCOMPATIBLE (run config): config 'grpo_7b_kl_cov': data.train.dataset_name='DAPOMath17k' is not in "
            "NeMo-RL's DATASET_REGISTRY (close: ['DAPOMath17K'])") in out.stderr


def test_preflight_refuses_overrides_without_a_config_name():
    out = _preflight(STANDIN, "main", "loss_fn.kl_cov_ratio=0.1")
    assert out.returncode == 2 and "need --config-name" in out.stderr


# ----------------------------------------------------------------------------------------------- old entropy
def test_token_values_survive_nemo_rl_metric_plumbing():
    import pickle

    from nemo_entropy.integrations.entropy_probe import TokenValues

    a = TokenValues(torch.tensor([3, 1]), torch.tensor([0.5, 1.5]))
    b = TokenValues(torch.tensor([7]), torch.tensor([2.0]))
    total = 0
    total += a  # the packing wrapper starts every metric at 0
    total = (total + b) / 4  # ... sums per sequence; workers divide by the number of global batches
    total = pickle.loads(pickle.dumps(total))
    assert total.uids.tolist() == [3, 1, 7] and total.values.tolist() == [0.5, 1.5, 2.0]


@pytest.mark.parametrize("generation", ["main"])
def test_old_entropy_pass_runs_nemo_rl_training_loop_in_eval_mode(generation, monkeypatch):
    """The driver's entropy pass through the stand-in's train loop equals float64 entropy of its logits."""
    monkeypatch.setenv("NEMO_RL_STANDIN_GENERATION", generation)
    monkeypatch.syspath_prepend(str(STANDIN))
    _drop_nemo_rl_modules()
    try:
        from nemo_rl.algorithms.grpo import MasterConfig, rollout_batch
        from nemo_rl.models.policy.lm_policy import Policy, bigram_logits

        from nemo_entropy.integrations.entropy_probe import old_entropy_of

        master = MasterConfig(policy={}, loss_fn={}, grpo={"num_prompts_per_step": 4, "num_generations_per_prompt": 4},
                              data={"sequence_length": 12}, checkpointing={}, cluster={})
        data = rollout_batch(0, master)
        data[batch_keys.TOKEN_UIDS] = token_uids_for(torch.arange(16), 12)
        got = old_entropy_of(Policy({"train_global_batch_size": 8, "train_micro_batch_size": 2}), data,
                             train_global_batch_size=8)
        logp = torch.log_softmax(bigram_logits(data["input_ids"]).double(), -1)[:, :-1]
        want = torch.zeros(16, 12, dtype=torch.float64)
        want[:, 1:] = -(logp.exp() * logp).sum(-1)
        valid = torch.zeros(16, 12, dtype=torch.bool)
        valid[:, 1:] = (data["token_mask"][:, 1:] * data["sample_mask"][:, None]) != 0
        torch.testing.assert_close(got[valid].double(), want[valid], rtol=1e-5, atol=1e-6)
        assert bool((got[~valid] == 0).all())
    finally:
        _drop_nemo_rl_modules()


DTENSOR_PACKING = ["policy.dtensor_cfg.enabled=true", "policy.megatron_cfg.enabled=false",
                   "policy.sequence_packing.enabled=true", "nemo_rl.input_type=logit"]


@pytest.mark.parametrize("method", ["entropy_pi", "entropy_bonus", "top_entropy"])
def test_dtensor_with_sequence_packing_is_refused_for_an_entropy_control_naming_both_keys(method, capsys):
    """NeMo-RL's DTensor backend hands a loss packed sequences with a seq_index; only its own log-probs helper reads
    them, so no entropy reaches a control (the old-entropy pass or the loss would fail at its first call with a
    context-parallelism message). Refused at validation (the dry-run) and in the preflight, both keys named."""
    argv = ["--config-name", "grpo_32b_baseline", "--dry-run", f"loss_fn.method={method}", *DTENSOR_PACKING]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "policy.dtensor_cfg.enabled=true" in err and "policy.sequence_packing.enabled=true" in err and method in err
    assert train.main([*argv[:3], "loss_fn.method=ppo", *DTENSOR_PACKING]) == 0  # no entropy needed: runs
    off = [a.replace("sequence_packing.enabled=true", "sequence_packing.enabled=false") for a in DTENSOR_PACKING]
    assert train.main([*argv[:4], *off]) == 0


def test_the_preflight_refuses_dtensor_with_sequence_packing_for_an_entropy_control():
    out = _preflight(STANDIN, "main", "--config-name", "grpo_32b_baseline", *STANDIN_RUN, "loss_fn.method=entropy_pi",
                     *DTENSOR_PACKING)
    assert out.returncode == 1 and "INCOMPATIBLE" in out.stderr, out.stdout + out.stderr
    assert "policy.dtensor_cfg.enabled=true" in out.stderr and "policy.sequence_packing.enabled=true" in out.stderr
