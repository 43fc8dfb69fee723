"""nemo_entropy.losses.policy_loss against an independent float64 re-implementation written here."""

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.losses import policy_loss
from nemo_entropy.plan import StepInputs, build_step_plan, reference_selection
from nemo_entropy.selection import select_tokens, token_uids_for


def _batch(seed=0, batch=10, length=24, spread=0.3):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    cur = old + spread * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    adv = torch.randn(batch, 1, generator=gen, dtype=torch.float64).expand(batch, length).contiguous()
    mask = torch.rand(batch, length, generator=gen) > 0.3
    mask[2] = False  # a fully masked row
    return cur, old, adv, mask


def reference_per_token(cfg, cur, old, adv, selected):
    """Float64 per-token loss written from the paper's formulas (README) and NeMo-RL's formula, independently."""
    log_r = torch.clamp(cur - old, -20.0, 20.0)
    r = torch.exp(log_r)
    pg1 = -adv * r
    pg2 = -adv * torch.clamp(r, 1 - cfg.ratio_clip_min, 1 + cfg.ratio_clip_max)
    clipped = torch.maximum(pg1, pg2)
    if cfg.ratio_clip_c is not None:
        clipped = torch.where(adv < 0, torch.minimum(clipped, -adv * cfg.ratio_clip_c), clipped)
    sel = selected.double()
    if cfg.method == "ppo":
        return clipped
    if cfg.method == "kl_cov":
        return pg1 + cfg.kl_cov_coef * log_r.abs() * sel
    return clipped * (1 - sel)


def reference_loss(cfg, cur, old, adv, mask, selected, gvt=None, gvs=None):
    per = reference_per_token(cfg, cur, old, adv, selected)
    m = mask.double()
    if cfg.token_level_loss:
        return (per * m).sum() / (m.sum() if gvt is None else gvt)
    per_seq = (per * m).sum(-1) / m.sum(-1).clamp(min=1)
    return per_seq.sum() / ((m.sum(-1) > 0).sum() if gvs is None else gvs)


CASES = [
    dict(method="ppo"),
    dict(method="ppo", ratio_clip_min=0.1, ratio_clip_max=0.28, ratio_clip_c=3.0),
    dict(method="ppo", token_level_loss=False),
    dict(method="kl_cov", kl_cov_ratio=0.05, kl_cov_coef=1.0),
    dict(method="kl_cov", kl_cov_ratio=0.2, kl_cov_coef=0.5, cov_form="vanilla"),
    dict(method="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=-1.0, clip_cov_ub=5.0, ratio_clip_min=1.0,
         ratio_clip_max=1.0),
    dict(method="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=0.0, clip_cov_ub=5.0, ratio_clip_c=2.0),
]


@pytest.mark.parametrize("scope", ["batch", "microbatch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_gradient_match_float64(case, scope):
    cfg = loss_config(dict(case, scope=scope))
    cur, old, adv, mask = _batch(seed=len(str(case)))
    uids = token_uids_for(torch.arange(cur.shape[0]), cur.shape[1])
    if scope == "batch":
        selected = select_tokens(cfg, old.float(), adv.float(), mask, token_uids=uids, step=3)
    else:
        # The reference's per-call selection on current detached log-probs (checked against verl's
        # procedure in the tests below).
        ratio = torch.exp(cur - old)
        clip_active = (-adv * ratio.clamp(1 - cfg.ratio_clip_min, 1 + cfg.ratio_clip_max)) > (-adv * ratio)
        selected = reference_selection(cfg, cur.float(), adv.float(), mask, token_uids=uids, step=3,
                                       clip_active=clip_active & mask).selected
    x = cur.float().clone().requires_grad_()
    # No plan: the loss plans over this call (the whole batch), which selects `selected` in batch scope.
    loss, metrics = policy_loss(cfg, x, old.float(), adv.float(), mask, token_uids=uids, step=3)
    loss.backward()

    x64 = cur.clone().requires_grad_()
    expected = reference_loss(cfg, x64, old, adv, mask, selected if cfg.method != "ppo" else torch.zeros_like(mask))
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)
    assert bool((x.grad[~mask] == 0).all()), "masked tokens must get no gradient"
    n = int(mask.sum())
    assert metrics["selected_fraction"] == pytest.approx(float((selected & mask).sum()) / n if cfg.method != "ppo" else 0)
    assert metrics["num_valid_tokens"] == n


def _verl_style_kl_cov_selection(cur, adv, mask, ratio):
    """The reference's KL-Cov choice: per call, flattened valid tokens, top-k of (A - mean A)(l - mean l)."""
    idx = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    a, l = adv.reshape(-1)[idx].float(), cur.reshape(-1)[idx].float()
    cov = (a - a.mean()) * (l - l.mean())
    k = max(1, int(len(cov) * ratio))
    chosen = torch.zeros(mask.numel(), dtype=torch.bool)
    chosen[idx[torch.topk(cov, k).indices]] = True
    return chosen.reshape(mask.shape)


@pytest.mark.parametrize("ratio", [2e-3, 0.05])
def test_microbatch_kl_cov_reproduces_the_reference_exactly(ratio):
    cfg = loss_config(dict(method="kl_cov", scope="microbatch", kl_cov_ratio=ratio))
    cur, old, adv, mask = _batch(seed=11, batch=16, length=64)
    selected = _verl_style_kl_cov_selection(cur.float(), adv.float(), mask, ratio)
    loss, _ = policy_loss(cfg, cur.float(), old.float(), adv.float(), mask)
    # Reference loss: -A r everywhere, + beta |l - l_old| on the reference's top-k, token mean.
    r = torch.exp(cur.float() - old.float())
    per = -adv.float() * r + cfg.kl_cov_coef * (cur.float() - old.float()).abs() * selected.float()
    expected = (per * mask.float()).sum() / mask.float().sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6, abs=1e-7)
    ours = reference_selection(cfg, cur.float(), adv.float(), mask, token_uids=token_uids_for(torch.arange(16), 64),
                               step=0, clip_active=torch.zeros_like(mask)).selected
    assert torch.equal(ours, selected)


def test_microbatch_clip_cov_has_the_references_candidates_and_count():
    cfg = loss_config(dict(method="clip_cov", scope="microbatch", clip_cov_ratio=0.02, clip_cov_lb=0.05,
                           clip_cov_ub=5.0, ratio_clip_min=0.2, ratio_clip_max=0.2))
    cur, old, adv, mask = _batch(seed=12, batch=16, length=64, spread=0.4)
    c, o, a = cur.float(), old.float(), adv.float()
    r = torch.exp(c - o)
    pg1, pg2 = -a * r, -a * r.clamp(0.8, 1.2)
    clip_by_origin = (pg2 > pg1) & mask
    m = mask.float()
    cov = (a - (a * m).sum() / m.sum()) * (c - (c * m).sum() / m.sum())
    candidates = (cov > 0.05) & (cov < 5.0) & mask & ~clip_by_origin
    k = max(int(0.02 * int(mask.sum())), 1)
    ours = reference_selection(cfg, c, a, mask, token_uids=token_uids_for(torch.arange(16), 64), step=5,
                               clip_active=clip_by_origin).selected
    assert int(ours.sum()) == min(k, int(candidates.sum())) and int(ours.sum()) > 0
    assert not bool((ours & ~candidates).any())
    loss, metrics = policy_loss(cfg, c, o, a, mask, step=5, token_uids=token_uids_for(torch.arange(16), 64))
    expected = (torch.maximum(pg1, pg2) * (~ours).float() * m).sum() / m.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(float(clip_by_origin.sum()) / m.sum().item())


@pytest.mark.parametrize("token_level", [True, False])
def test_micro_batch_losses_sum_to_the_batch_loss(token_level):
    cfg = loss_config(dict(method="kl_cov", kl_cov_ratio=0.05, token_level_loss=token_level))
    cur, old, adv, mask = _batch(seed=5, batch=12)
    cur, old, adv = cur.float(), old.float(), adv.float()
    uids = token_uids_for(torch.arange(12), cur.shape[1])
    plan = build_step_plan(cfg, StepInputs(old, adv, mask, uids), step=0)
    full, full_metrics = policy_loss(cfg, cur, old, adv, mask, token_uids=uids)
    total, summed = 0.0, {}
    for lo in range(0, 12, 4):
        part = slice(lo, lo + 4)
        loss, metrics = policy_loss(cfg, cur[part], old[part], adv[part], mask[part], plan=plan.rows(part))
        total += float(loss)
        for key, value in metrics.items():
            summed[key] = summed.get(key, 0.0) + value if not key.endswith(("_min", "_max")) else value
    assert total == pytest.approx(float(full), rel=1e-5)
    for key in ("clip_fraction", "selected_fraction", "kl_to_old", "ratio_mean", "cov_mean", "cov_selected_mean",
                "entropy_proxy", "num_valid_tokens"):
        assert summed[key] == pytest.approx(full_metrics[key], rel=1e-5, abs=1e-7), key


def test_loss_is_linear_in_one_over_count():
    cfg = loss_config(dict(method="ppo"))
    cur, old, adv, mask = _batch(seed=6)
    one, _ = policy_loss(cfg, cur.float(), old.float(), adv.float(), mask, global_valid_tokens=1.0,
                         global_valid_seqs=1.0)
    scaled, _ = policy_loss(cfg, cur.float(), old.float(), adv.float(), mask, global_valid_tokens=123.0,
                            global_valid_seqs=1.0)
    assert float(scaled) * 123.0 == pytest.approx(float(one), rel=1e-6)


def test_fully_masked_call_gives_zero_loss_and_zero_gradient():
    cfg = loss_config(dict(method="clip_cov", clip_cov_lb=-1.0))
    cur, old, adv, _ = _batch()
    mask = torch.zeros(cur.shape, dtype=torch.bool)
    x = cur.float().requires_grad_()
    loss, metrics = policy_loss(cfg, x, old.float(), adv.float(), mask)
    loss.backward()
    assert float(loss) == 0.0 and bool((x.grad == 0).all()) and metrics["num_valid_tokens"] == 0


def test_kl_cov_penalty_is_zero_on_policy_and_bf16_logprobs_work():
    cfg = loss_config(dict(method="kl_cov", kl_cov_ratio=0.1))
    cur, _, adv, mask = _batch(seed=7)
    x = cur.to(torch.bfloat16).requires_grad_()
    loss, metrics = policy_loss(cfg, x, x.detach().float(), adv.float(), mask)
    loss.backward()
    # On policy r = 1: loss = -mean(A), penalty 0, KL 0.
    expected = float((-adv.float() * mask.float()).sum() / mask.float().sum())
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert metrics["kl_to_old"] == 0.0 and x.grad.dtype == torch.bfloat16


def test_bad_inputs_to_the_loss_raise():
    cfg = loss_config({})
    cur, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        policy_loss(cfg, cur.float(), old.float()[:, 1:], adv.float(), mask)
    with pytest.raises(TypeError, match="selected"):  # the loss takes a plan, not its pieces
        policy_loss(cfg, cur.float(), old.float(), adv.float(), mask, selected=mask)
    with pytest.raises(ValueError, match="reference_logprobs"):
        policy_loss(loss_config(dict(reference_policy_kl_penalty=0.1)), cur.float(), old.float(), adv.float(), mask)
    with pytest.raises(TypeError, match="scores"):
        policy_loss(cfg, cur.float(), old.float(), adv.float(), mask, scores=adv.float())


def test_accumulate_metrics_sums_and_takes_extrema():
    from nemo_entropy.losses import accumulate_metrics

    parts = [{"loss": 0.5, "ratio_min": 0.9, "ratio_max": 1.1}, {"loss": 0.25, "ratio_min": 0.7, "ratio_max": 1.3}]
    total = {}
    for part in parts:
        accumulate_metrics(total, part, divisor=4.0)
    assert total == {"loss": (0.5 + 0.25) / 4.0, "ratio_min": 0.7, "ratio_max": 1.3}
