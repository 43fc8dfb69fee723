"""Passes per rollout (``engine.ppo_epochs``), NeMo-RL's dynamic sampling, the per-pass diagnostics of the
covariance selection and the first-order entropy-change check of the local engine (docs/engine.md)."""

from __future__ import annotations

import pytest
import torch

from nemo_entropy.config import to_plain
from nemo_entropy.engine.rollout import uniform_groups
from nemo_entropy.engine.settings import EngineSettings
from nemo_entropy.engine.trainer import GRPOTrainer, build_layout
from nemo_entropy.train import compose_config

from .test_engine import tiny_overrides

# Scoring the rollout and the first training forward see the same rows in the same shapes (generation and
# micro-batches of 8), so on the first optimizer step of a rollout log r is exactly 0 on every CPU.
ALIGNED = ["policy.generation_batch_size=8", "checkpointing.enabled=false"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("warm_start"))


def _trainer(tmp_path, cache_dir, config="local_kl_cov", extra=(), task="addition"):
    cfg = compose_config(config, tiny_overrides(tmp_path / "run", cache_dir, extra=[*ALIGNED, *extra], task=task))
    trainer = GRPOTrainer(EngineSettings.from_config(dict(to_plain(cfg)), world_size=1), build_layout(1))
    trainer.initialise()
    return trainer


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}


def test_two_passes_are_two_passes_over_the_same_rollout_bit_for_bit(tmp_path, cache_dir):
    """``ppo_epochs: 2`` runs the rollout's mini-batches twice against the same old log-probs, each optimizer step
    with its own plan: the same arithmetic as two one-pass calls on the same rollout, so the weights agree exactly."""
    two = _trainer(tmp_path / "two", cache_dir, extra=["+engine.ppo_epochs=2"])
    one = _trainer(tmp_path / "one", cache_dir)
    rollout = two.rollout(1)
    assert torch.equal(rollout.responses, one.rollout(1).responses)
    metrics = two.train_on(rollout)
    one.train_on(rollout)
    one.train_on(rollout)
    assert two.optimizer_step == one.optimizer_step == 4 and metrics["optimizer_steps"] == 4.0
    w1, w2 = _weights(one), _weights(two)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_per_pass_diagnostics_of_kl_cov(tmp_path, cache_dir):
    """Pass 1: the first of its two optimizer steps is on-policy (log r == 0 on every selected token, so KL-Cov's
    penalty gradient is exactly 0): half its steps. Pass 2: every step is off-policy. The gradient share is a
    ratio of norms in [0, 1] (the selected tokens' policy gradient against all tokens'), brute-forced here."""
    trainer = _trainer(tmp_path, cache_dir, extra=["+engine.ppo_epochs=2", "+engine.step_diagnostics=1"])
    rollout = trainer.rollout(1)
    metrics = trainer.train_on(rollout)
    assert metrics["penalty_zero_step_fraction_pass1"] == 0.5
    assert metrics["penalty_zero_step_fraction_pass2"] == 0.0
    for p in (1, 2):
        assert 0.0 <= metrics[f"selected_neg_log_ratio_fraction_pass{p}"] <= 1.0
        assert 0.0 <= metrics[f"selected_pg_grad_share_pass{p}"] < 1.0
    # Only the steps of pass 1 after its first have log r != 0: at most half of pass 1's selections are negative.
    assert metrics["selected_neg_log_ratio_fraction_pass1"] <= 0.5 + 1e-12


def test_gradient_share_matches_a_brute_force_norm(tmp_path, cache_dir):
    from nemo_entropy.engine.step_diagnostics import StepDiagnostics
    from nemo_entropy.exact import token_uids_for
    from nemo_entropy.plan import StepInputs, build_step_plan
    from nemo_entropy.surrogate import clipped_surrogate, importance_ratio

    trainer = _trainer(tmp_path, cache_dir, task="countdown")
    rollout = trainer.rollout(1)
    rows = slice(0, trainer.s.train_global_batch_size)
    length = rollout.responses.shape[1]
    old, mask = rollout.old_logprobs[rows], rollout.mask[rows]
    adv = rollout.advantages[rows, None].expand(-1, length).contiguous()
    plan = build_step_plan(trainer.loss_cfg, StepInputs(old, adv, mask, token_uids_for(rollout.sample_ids[rows], length)),
                           step=0, controls=trainer.controls)
    assert int(plan.selected.sum()) >= 1
    diag = StepDiagnostics(1)
    for start in range(0, 16, 8):
        mb = slice(start, start + 8)
        _, logprobs = trainer._score(rollout.prompts[mb], rollout.responses[mb])
        diag.micro_batch(trainer, trainer.loss_cfg, logprobs, old[mb], adv[mb], mask[mb], plan.rows(mb))
    diag.end_step(trainer, penalised=True)
    # brute force: one loss over the whole mini-batch (not its micro-batches), its gradient with and without the
    # unselected tokens
    _, logprobs = trainer._score(rollout.prompts[rows], rollout.responses[rows])
    _, ratio, clamped = importance_ratio(trainer.loss_cfg, logprobs, old, mask)
    surrogate, _ = clipped_surrogate(trainer.loss_cfg, adv, ratio, clamped, logprobs)
    n = mask.sum()
    params = list(trainer.policy.parameters())

    def norm(values):
        grads = torch.autograd.grad((values * mask).sum() / n, params, retain_graph=True, allow_unused=True)
        return float(sum(g.double().pow(2).sum() for g in grads if g is not None)) ** 0.5

    expected = norm(surrogate * plan.selected) / norm(surrogate)
    assert expected > 0.0
    assert diag.metrics()["selected_pg_grad_share_pass1"] == pytest.approx(expected, rel=1e-3)


def test_dynamic_sampling_trains_only_groups_with_signal(tmp_path, cache_dir):
    trainer = _trainer(tmp_path, cache_dir, extra=["grpo.use_dynamic_sampling=true", "grpo.batch_multiplier=1.5"])
    rollout = trainer.rollout(1)
    g = trainer.s.num_generations_per_prompt
    assert rollout.rewards.numel() == trainer.s.samples_per_step
    assert not bool(uniform_groups(rollout.rewards, g).any())           # every trained group has signal
    ids = rollout.sample_ids.view(-1, g)
    assert torch.equal(ids, ids[:, :1] + torch.arange(g))               # whole groups, in generation order
    assert bool((ids[1:, 0] > ids[:-1, 0]).all())
    info = trainer.generation_metrics
    per_batch = int(trainer.s.num_prompts_per_step * 1.5) * g
    assert info["dynamic_sampling_num_gen_batches"] == float(-(-(int(ids.max()) + 1) // per_batch))
    # NeMo-RL's advantages of the kept groups: (r - mean) / (std + 1e-6) per group
    grouped = rollout.rewards.double().view(-1, g)
    expected = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rollout.advantages.double(), expected.view(-1).float().double(), rtol=0, atol=1e-6)
    assert 0.0 < info["reward_mean_generated"] < 1.0
    assert info["dynamic_sampling_num_discarded_valid_samples"] >= 0


def test_dynamic_sampling_stops_after_max_gen_batches_as_nemo_rl(tmp_path, cache_dir, monkeypatch):
    trainer = _trainer(tmp_path, cache_dir, extra=["grpo.use_dynamic_sampling=true",
                                                    "grpo.dynamic_sampling_max_gen_batches=2"])
    calls = []

    def no_signal(operands, responses):
        calls.append(len(responses))
        return torch.zeros(len(responses))

    monkeypatch.setattr(type(trainer.task), "rewards", lambda self, operands, responses: no_signal(operands, responses))
    with pytest.raises(RuntimeError, match=r"grpo.dynamic_sampling_max_gen_batches=2"):
        trainer.rollout(1)
    assert len(calls) == 3  # NeMo-RL's grpo.dynamic_sampling: batches 1..max continue, batch max + 1 raises


@pytest.mark.parametrize("override, key", [
    ("+engine.ppo_epochs=0", "engine.ppo_epochs"),
    ("grpo.batch_multiplier=2", "grpo.batch_multiplier"),
    ("grpo.use_dynamic_sampling=yes", "grpo.use_dynamic_sampling"),
    ("+engine.step_diagnostics=-1", "engine.step_diagnostics"),
    ("+policy.optimizer.kwargs.momentum=0.9", "policy.optimizer.kwargs.momentum"),
])
def test_bad_pass_and_sampling_keys_are_refused_by_name(tmp_path, cache_dir, override, key):
    extra = [override] + (["policy.optimizer.name=torch.optim.SGD"] if "momentum" in override else [])
    cfg = compose_config("local_kl_cov", tiny_overrides(tmp_path, cache_dir, extra=extra))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        EngineSettings.from_config(dict(to_plain(cfg)))


def test_entropy_change_check_first_order_term_converges_to_the_observed_change(tmp_path, cache_dir):
    """Lemma 1 with the measured logit change is the first-order term of the observed entropy change on the same
    tokens: with plain SGD the gap is second order, so its relative size shrinks in proportion to the step
    (measured on this rollout: 15% at lr 2e-3, 4% at 5e-4; the bounds are 0.5x and 10%)."""
    gaps = []
    for lr in (2e-3, 5e-4):
        trainer = _trainer(tmp_path / str(lr), cache_dir, config="local_grpo", extra=[
            "+engine.entropy_change_check=true", "policy.optimizer.name=torch.optim.SGD",
            f"policy.optimizer.kwargs.lr={lr}"])
        assert isinstance(trainer.optimizer, torch.optim.SGD)
        metrics = trainer.train_on(trainer.rollout(1))
        observed, first = metrics["entropy_change_observed"], metrics["entropy_change_first_order"]
        assert observed != 0.0 and first * observed > 0, (lr, observed, first)
        gaps.append(abs(first - observed) / abs(observed))
    assert gaps[1] < 0.5 * gaps[0] and gaps[1] < 0.10, gaps
