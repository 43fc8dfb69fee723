"""The control-unit mechanisms the entropy-driven controls rely on, tested with a toy control registered for the test:
values a control computes from the current logits (``needs`` ``logits``, ``Control.logit_values``) reach its
per-token hook with their gradient; ``TokenBatch.loss_sum`` normalises like the loss at the token and the sequence
level; ``TokenBatch.step_constant`` shares sum to the constant over micro-batches; a NeMo-RL config that gives such
a control log-probs only is refused naming both keys."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from nemo_entropy import controls as controls_pkg
from nemo_entropy.config import loss_config
from nemo_entropy.controls import Control, ControlConfig, ControlSet
from nemo_entropy.integrations.nemo_rl_run import check_nemo_rl_run_config
from nemo_entropy.losses import accumulate_metrics, policy_loss


@dataclass(frozen=True)
class _ToyConfig(ControlConfig):
    toy_coef: float = 0.5


class _LogitToy(Control):
    """Adds ``toy_coef * logsumexp(z)`` per token, from its own logit values; logs three shares."""

    name = "logit_toy"
    config_class = _ToyConfig
    needs = frozenset({"logits"})

    def logit_values(self, logits_shard, *, tp_group, vocab_start, vocab_size):
        return {"lse": torch.logsumexp(logits_shard[..., :vocab_size].float(), -1)}

    def adjust(self, tokens, values, surrogate):
        return None, self.config.toy_coef * tokens.logit_values[self.name]["lse"]

    def metrics(self, tokens, values):
        lse = tokens.logit_values[self.name]["lse"].detach()
        return {"toy_token": float(tokens.token_sum(lse)), "toy_loss": float(tokens.loss_sum(lse)),
                "toy_constant": tokens.step_constant(0.7)}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(controls_pkg.REGISTRY, _LogitToy.name, _LogitToy)
    return _LogitToy


def _data(seed=0, batch=6, length=7, vocab=9):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    adv = torch.randn(batch, 1, generator=gen, dtype=torch.float64).expand(batch, length)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    mask[1] = False
    return logits, targets, adv, mask


@pytest.mark.parametrize("token_level", [True, False])
def test_logit_values_reach_the_control_with_their_gradient(toy, token_level):
    logits, targets, adv, mask = _data()
    cfg = loss_config({"method": "ppo", "controls": ["logit_toy"], "toy_coef": 0.5, "token_level_loss": token_level})
    controls = ControlSet(cfg)
    assert controls.needs == {"logits"}
    x = logits.float().clone().requires_grad_(True)
    total, metrics = 0.0, {}
    old = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1).float()
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        logp = torch.log_softmax(x[rows], -1).gather(-1, targets[rows, :, None]).squeeze(-1)
        values = controls.logit_values(x[rows])
        loss, m = policy_loss(cfg, logp, old[rows], adv[rows].float(), mask[rows], logit_values=values,
                              controls=controls, global_valid_tokens=float(mask.sum()),
                              global_valid_seqs=float(mask.any(-1).sum()))
        loss.backward()
        total += float(loss)
        accumulate_metrics(metrics, m)
    # float64 reference: on policy, the surrogate is -A r with r = 1; the toy term 0.5 lse(z), both normalised.
    z = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1).gather(-1, targets[..., None]).squeeze(-1)
    per_token = -adv * torch.exp(logp - logp.detach()) + 0.5 * torch.logsumexp(z, -1)
    m = mask.double()
    if token_level:
        ref = (per_token * m).sum() / m.sum()
    else:
        ref = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / (m.sum(-1) > 0).sum()
    ref.backward()
    assert total == pytest.approx(float(ref), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), z.grad, rtol=1e-4, atol=1e-6)
    lse = torch.logsumexp(logits, -1)
    assert metrics["toy_token"] == pytest.approx(float((lse * m).sum() / m.sum()), rel=1e-5)
    loss_norm = float((lse * m).sum() / m.sum()) if token_level else \
        float(((lse * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / (m.sum(-1) > 0).sum())
    assert metrics["toy_loss"] == pytest.approx(loss_norm, rel=1e-5)
    assert metrics["toy_constant"] == pytest.approx(0.7, rel=1e-12)


def test_missing_or_misshapen_logit_values_are_refused_naming_the_control(toy):
    logits, targets, adv, mask = _data(seed=1)
    cfg = loss_config({"method": "ppo", "controls": ["logit_toy"]})
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1).float()
    args = (cfg, logp, logp, adv.float(), mask)
    with pytest.raises(ValueError, match=r"\['logit_toy'\] need values computed from the current logits"):
        policy_loss(*args)
    with pytest.raises(ValueError, match=r"logit_values\['logit_toy'\]\['lse'\] must be a tensor of shape \(6, 7\)"):
        policy_loss(*args, logit_values={"logit_toy": {"lse": torch.zeros(6, 6)}})


def test_a_nemo_rl_config_with_logprob_input_is_refused_for_a_control_that_needs_logits(toy):
    config = {"loss_fn": {"method": "ppo", "controls": ["logit_toy"]}}
    with pytest.raises(ValueError, match=r"loss_fn.method='ppo' / loss_fn.controls=\['logit_toy'\].*"
                                         r"nemo_rl.input_type='logprob'.*set nemo_rl.input_type=logit"):
        check_nemo_rl_run_config(config, {"input_type": "logprob"})
    check_nemo_rl_run_config(config, {"input_type": "logit"})
