"""NeMo-RL's own ``grpo_train`` with the plugin installed as the run entry installs it (see harness.py).

(a) the selected tokens reaching the loss equal a direct ``select_tokens`` over each whole optimizer step;
(b) the loss metrics arrive in NeMo-RL's logger with NeMo-RL's reductions;
(c) after a checkpoint and a resume, the optimizer-step counter continues and Clip-Cov selects what an
    uninterrupted run selects.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from nemo_entropy.integrations import batch_keys
from nemo_entropy.integrations.step_plan import STATE_FILE

from . import reference as ref
from .harness import GENERATIONS_PER_PROMPT, PROMPTS_PER_STEP, STEPS, TRAIN_GLOBAL_BATCH, RunSpec

STEPS_PER_ROLLOUT = PROMPTS_PER_STEP * GENERATIONS_PER_PROMPT // TRAIN_GLOBAL_BATCH

# DP 1 first, then DP 2: one CPU worker group alive at a time.
MATRIX = [RunSpec(method, packing, dp) for dp in (1, 2) for packing in (False, True)
          for method in ("kl_cov", "clip_cov")]
# NeMo-RL hands the loss raw logits (LossInputType.LOGIT): the adapter's log-probs and full-vocabulary entropy
MATRIX.append(RunSpec("kl_cov", True, 2, input_type="logit"))
IDS = [s.name for s in MATRIX]
WORKER_METRICS = {"lr", "global_valid_seqs", "global_valid_toks"}  # added by the worker, not by the loss


def _close(logged: float, expected: float) -> bool:
    """Tensorboard stores fp32 scalars; the sums are fp32 in a different order."""
    return math.isclose(logged, expected, rel_tol=2e-5, abs_tol=2e-6)


def test_install_wraps_the_entries_and_replaces_the_loss(installer):
    grpo = installer.grpo
    wrapped = installer.install({"plan": "driver", "input_type": "logit"})
    assert "grpo_train" in wrapped and "async_grpo_train" in wrapped
    assert grpo.grpo_train is not installer.originals["grpo_train"]
    loss = grpo.ClippedPGLossFn(grpo.ClippedPGLossConfig(**{"method": "clip_cov"}), use_fused_linear_logprobs=False)
    assert type(loss).__name__ == "EntropyControlLossFn"
    assert loss.config.method == "clip_cov"
    from nemo_rl.algorithms.loss.interfaces import LossInputType

    assert loss.input_type is LossInputType.LOGIT  # NeMo-RL's own enum member: prepare_loss_input compares to it


# ----------------------------------------------------------------------------------------------- (a)
@pytest.mark.parametrize("spec", MATRIX, ids=IDS)
def test_selection_reaching_the_loss_is_the_whole_step_selection(harness, spec):
    run = harness.run(spec)
    assert len(run.train_calls) == STEPS, "grpo_train did not run every step"
    selected_total = 0
    for t, call in enumerate(run.train_calls, start=1):
        data = ref.step_data(run.logged_train_data(t))
        assert call.wrapper_type == "StepPlanPolicy", "grpo_train trained an unwrapped policy"
        expected, steps = ref.expected_selection(data, spec.method, first_step=(t - 1) * STEPS_PER_ROLLOUT)
        got = ref.reached(call.records, data.mask.shape)
        # every valid token of the step reached exactly one (non-dummy) loss call on one DP rank; no other did
        assert torch.equal(got.coverage, data.mask.long()), f"step {t}: tokens lost or duplicated on the way"
        assert torch.equal(got.uids[data.mask], data.uids[data.mask]), f"step {t}: token uids differ"
        expected_steps = torch.tensor(steps).repeat_interleave(TRAIN_GLOBAL_BATCH)
        assert torch.equal(got.step, expected_steps), f"step {t}: attached entropy_step {got.step.tolist()}"
        assert torch.equal(got.selected, expected), (
            f"step {t}: selection reaching the loss differs from select_tokens over the optimizer step at "
            f"{torch.nonzero(got.selected != expected).tolist()}")
        # a non-empty selection in every optimizer step (the quota is max(1, ...)): the check is not vacuous
        for j in range(data.optimizer_steps):
            assert int(expected[data.rows(j)].sum()) >= 1, f"step {t}.{j}: nothing selected"
        selected_total += int(expected.sum())
        if spec.dp == 2:
            assert {r["dp_rank"] for r in got.calls} == {0, 1}, "both DP ranks must have trained"
        if spec.packing:
            assert all(r["mask"].shape[0] == 1 for r in got.calls), "packing: one loss call per packed sequence"
    assert selected_total >= STEPS * STEPS_PER_ROLLOUT


@pytest.mark.parametrize("spec", [s for s in MATRIX if s.method == "clip_cov"], ids=lambda s: s.name)
def test_clip_cov_selection_depends_on_the_step_counter(harness, spec):
    """The check above would catch a wrong step counter: the same tokens with another step select differently."""
    run = harness.run(spec)
    differs = 0
    for t in range(1, STEPS + 1):
        data = ref.step_data(run.logged_train_data(t))
        right, _ = ref.expected_selection(data, spec.method, first_step=(t - 1) * STEPS_PER_ROLLOUT)
        shifted, _ = ref.expected_selection(data, spec.method, first_step=(t - 1) * STEPS_PER_ROLLOUT + 1)
        differs += int(not torch.equal(right, shifted))
    assert differs >= 1


# ----------------------------------------------------------------------------------------------- (b)
@pytest.mark.parametrize("spec", MATRIX, ids=IDS)
def test_loss_metrics_arrive_in_nemo_rl_logger_with_its_reductions(harness, spec):
    run = harness.run(spec)
    scalars = run.tensorboard_scalars()
    for t, call in enumerate(run.train_calls, start=1):
        data = ref.step_data(run.logged_train_data(t))
        calls = [r for r in call.records if not r["dummy"]]
        # independent values from the loss inputs (current log-probs as the loss received them)
        expected = ref.expected_metrics(spec.method, calls, data)
        assert ("entropy" in expected) == (spec.input_type == "logit")
        for name, want in expected.items():
            got = scalars[f"train/{name}"][t]
            assert _close(got, want), f"step {t}: train/{name} = {got}, expected {want}"
        # the same values from the whole-step select_tokens instead of the attached keys (the reference the
        # in-worker test below relies on)
        whole_step, _ = ref.expected_selection(data, spec.method, first_step=(t - 1) * STEPS_PER_ROLLOUT)
        assert ref.expected_metrics(spec.method, calls, data, selection=whole_step) == expected
        # every metric the loss returned is logged, reduced the way NeMo-RL reduces it
        names = set().union(*(r["metrics"] for r in calls)) - WORKER_METRICS
        for name in sorted(names):
            want = ref.nemo_rl_reduction(name, [r["metrics"][name] for r in calls], data.optimizer_steps)
            assert f"train/{name}" in scalars, f"loss metric {name} never reached the logger"
            got = scalars[f"train/{name}"][t]
            assert _close(got, want), f"step {t}: train/{name} = {got}, expected {want}"
    # the policy actually moved within each rollout (ratios != 1 after the first optimizer step)
    assert any(abs(scalars["train/probs_ratio_max"][t] - 1) > 1e-4 for t in range(1, STEPS + 1))


# ----------------------------------------------------------------------------------------------- (c)
RESUME = RunSpec("clip_cov", True, 2)


def test_resume_continues_the_step_counter_and_clip_cov_selects_as_uninterrupted(harness):
    full = harness.run(RESUME)
    checkpoints = harness.workdir / "resume-checkpoints"
    first = harness.run(RunSpec(RESUME.method, RESUME.packing, RESUME.dp, max_steps=3), name="resume-part1",
                        checkpoint_dir=checkpoints)
    second = harness.run(RESUME, name="resume-part2", checkpoint_dir=checkpoints)
    assert len(first.train_calls) == 3 and first.final_save_state.total_steps == 3
    assert (checkpoints / "step_3" / "training_info.json").is_file()
    # the driver-side state the plugin writes into NeMo-RL's checkpoint
    controls_state = json.loads((checkpoints / "step_3" / STATE_FILE).read_text())
    assert controls_state["optimizer_step"] == 3 * STEPS_PER_ROLLOUT
    loaded = second.start_save_state
    assert loaded.total_steps == 3, "the second grpo_train did not load NeMo-RL's save state"
    # resumed inside the second epoch: the within-epoch counter differs from the run-wide one
    assert (loaded.current_epoch, loaded.current_step) == (1, 1)
    assert len(second.train_calls) == STEPS - 3

    for k, call in enumerate(second.train_calls):
        t = 4 + k
        # StepPlanPolicy.optimizer_step after this rollout, and the steps attached to train_data
        assert call.wrapper_type == "StepPlanPolicy"
        assert call.optimizer_step_after == t * STEPS_PER_ROLLOUT, (
            f"rollout {t}: optimizer_step {call.optimizer_step_after}, expected {t * STEPS_PER_ROLLOUT}")
        want_steps = torch.arange((t - 1) * STEPS_PER_ROLLOUT, t * STEPS_PER_ROLLOUT).repeat_interleave(
            TRAIN_GLOBAL_BATCH)
        assert torch.equal(call.data[batch_keys.STEP], want_steps)
        # same data as the uninterrupted run at this step (weights, optimizer, data loader and sampling resumed) ...
        resumed, uninterrupted = second.logged_train_data(t), full.logged_train_data(t)
        for key in ("token_ids", "prev_logprobs", "advantages", "token_loss_mask"):
            assert torch.equal(resumed[key], uninterrupted[key]), f"rollout {t}: {key} differs after the resume"
        # ... and the same Clip-Cov selection reaching the loss, bit for bit
        data = ref.step_data(resumed)
        got = ref.reached(call.records, data.mask.shape).selected
        want = ref.reached(full.train_calls[t - 1].records, data.mask.shape).selected
        assert torch.equal(got, want), f"rollout {t}: Clip-Cov selected differently after the resume"

    # not vacuous: a counter restarted at 0 would have selected something else
    restarted = []
    for k in range(STEPS - 3):
        data = ref.step_data(second.logged_train_data(4 + k))
        wrong, _ = ref.expected_selection(data, RESUME.method, first_step=k * STEPS_PER_ROLLOUT)
        right, _ = ref.expected_selection(data, RESUME.method, first_step=(3 + k) * STEPS_PER_ROLLOUT)
        restarted.append(not torch.equal(wrong, right))
    assert any(restarted)


# ----------------------------------------------------------------------------------------------- in-worker selection
WORKER_DP2 = RunSpec("kl_cov", False, 2, selection="worker", micro_batch=TRAIN_GLOBAL_BATCH // 2)


def test_in_worker_selection_with_dp2_is_the_step_selection_or_refused(harness):
    """``nemo_rl.plan: worker`` with DP 2 and ``train_micro_batch_size x DP == train_global_batch_size`` (which
    validation accepts): the loss must select over the whole optimizer step across both ranks (as
    ``scope: batch`` promises), or the run must be refused by name before it starts. On NeMo-RL's DTensor path the
    loss gets no DP group (no megatron ``parallel_state``), so each rank selects over its own half."""
    try:
        run = harness.run(WORKER_DP2)
    except ValueError as err:  # refused by name: acceptable
        assert "nemo_rl.plan" in str(err), str(err)
        return
    scalars = run.tensorboard_scalars()
    mismatches = []
    for t, call in enumerate(run.train_calls, start=1):
        data = ref.step_data(run.logged_train_data(t))
        assert {r["dp_rank"] for r in call.records} == {0, 1}
        assert all(r["selected"] is None for r in call.records), "worker mode attaches no selection"
        whole_step, _ = ref.expected_selection(data, WORKER_DP2.method, first_step=(t - 1) * STEPS_PER_ROLLOUT)
        expected = ref.expected_metrics(WORKER_DP2.method, [r for r in call.records if not r["dummy"]], data,
                                        selection=whole_step)
        for name in ("selected_fraction", "cov_selected_mean", "loss"):
            got = scalars[f"train/{name}"][t]
            if not _close(got, expected[name]):
                mismatches.append(f"step {t}: train/{name} = {got:.6g}, the whole-step selection gives "
                                  f"{expected[name]:.6g}")
    assert not mismatches, "in-worker selection on DP 2 is not the step's selection:\n" + "\n".join(mismatches)


# ----------------------------------------------------------------------------------------------- old entropy
OLD_ENTROPY_RUN = RunSpec("top_entropy", True, 2, max_steps=3, input_type="logit")


def test_old_entropy_pass_and_top_entropy_inside_nemo_rl(harness):
    """``top_entropy`` needs the old policy's per-token entropy before the step: the driver gets it from one
    eval-mode pass of NeMo-RL's own training loop (OldEntropyProbe through its loss wrappers, packing on, DP 2).
    At each rollout's first optimizer step the weights are still those of that pass, so the attached
    ``entropy_old`` must equal the entropy of the logits the loss receives there (independently recomputed by the
    recorder from raw logits), and the kept tokens must be the top ceil(0.2 N) of the whole step by it."""
    from nemo_entropy.controls.top_entropy import kept_count

    run = harness.run(OLD_ENTROPY_RUN)
    # each rollout: the eval-mode entropy pass (no loss records), then the training call
    training = [c for c in run.train_calls if c.records]
    assert len(run.train_calls) == 2 * OLD_ENTROPY_RUN.max_steps and len(training) == OLD_ENTROPY_RUN.max_steps
    for t, call in enumerate(training, start=1):
        first = [r for r in call.records if not r["dummy"] and r["global_batch"] == 0]
        assert {r["dp_rank"] for r in first} == {0, 1}
        for r in first:
            assert r["old_entropy"] is not None and r["kept"] is not None
            valid = r["mask"]
            torch.testing.assert_close(r["old_entropy"][valid], r["entropy"][valid], rtol=1e-4, atol=1e-5)
        # the whole step's kept set, against a brute-force sort of its old entropy (ties: smaller uid first)
        uids = torch.cat([r["uids"][r["mask"]] for r in first])
        entropy = torch.cat([r["old_entropy"][r["mask"]] for r in first]).double()
        kept = torch.cat([r["kept"][r["mask"]] for r in first])
        k = kept_count(0.2, int(uids.numel()))
        order = sorted(range(len(uids)), key=lambda i: (-float(entropy[i]), int(uids[i])))
        want = torch.zeros(len(uids), dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(kept, want), f"rollout {t}: kept tokens differ from the step's top {k} by old entropy"
