"""nemo_entropy.law.readers / keys / series: the same run written as our metrics.jsonl (by the engine's own
writer), as NeMo-RL-style TensorBoard events (torch's SummaryWriter) and as a W&B-style CSV gives the same
points and the same fit; dropped steps are counted; bad files and missing keys give errors that name them."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest

from nemo_entropy.law import (ENTROPY_KEYS, PERFORMANCE_KEYS, LawInputError, fit_run, pair_series, read_run,
                              resolve_key)

STEPS = 60
VAL_PERIOD = 5


def synthetic_run(seed=0, a=0.5, b=0.9):
    """Per-step entropy (every step from 1) and validation accuracy (step 0 and every VAL_PERIOD steps), drawn
    from a known law and rounded to float32 so that TensorBoard's float32 storage is exact."""
    rng = np.random.default_rng(seed)
    entropy = {s: float(np.float32(1.0 * math.exp(-s / 25) + 0.05 + rng.normal(0, 0.01))) for s in range(1, STEPS + 1)}
    accuracy = {0: 0.4}
    for s in range(VAL_PERIOD, STEPS + 1, VAL_PERIOD):
        accuracy[s] = float(np.float32(-a * math.exp(entropy[s]) + b + rng.normal(0, 0.01)))
    reward = {s: float(np.float32(0.3 + s / 200)) for s in range(1, STEPS + 1)}
    return entropy, accuracy, reward


def write_ours(log_dir, entropy, accuracy, reward):
    """What the engine writes, with the engine's own writer: metrics.jsonl and TensorBoard events in tb/."""
    from nemo_entropy.engine.metrics import MetricsLog

    log = MetricsLog(str(log_dir), enabled=True, tensorboard=True, resume_step=None)
    log.write(0, {"val_accuracy": accuracy[0], "warm_start_loss": 0.2})
    for s in range(1, STEPS + 1):
        record = {"reward_mean": reward[s], "entropy_mean": entropy[s], "loss": 0.01}
        if s in accuracy:
            record["val_accuracy"] = accuracy[s]
        log.write(s, record)
    log.close()
    return str(log_dir)


def write_nemo_rl_tensorboard(log_dir, entropy, accuracy, reward):
    """NeMo-RL's logger: <log_dir>/tensorboard, tags train/<metric> and validation/<metric>."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(str(log_dir), "tensorboard"))
    for s in range(0, STEPS + 1):
        if s in accuracy:
            writer.add_scalar("validation/accuracy", accuracy[s], s)
        if s in entropy:
            writer.add_scalar("train/entropy", entropy[s], s)
            writer.add_scalar("train/reward", reward[s], s)
    writer.close()
    return str(log_dir)


def write_wandb_csv(path, entropy, accuracy, reward, *, prefix=""):
    """A W&B-style export: a Step column, empty cells where a metric was not logged."""
    cols = [f"{prefix}train/entropy", f"{prefix}validation/accuracy", f"{prefix}train/reward"]
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["Step", *cols])
        for s in range(0, STEPS + 1):
            out.writerow([s, *(repr(d[s]) if s in d else "" for d in (entropy, accuracy, reward))])
    return str(path)


def fitted(path, **kwargs):
    scalars = read_run(path, **kwargs)
    series = pair_series(scalars, resolve_key(scalars, None, ENTROPY_KEYS, role="entropy", flag="--entropy-key"),
                         resolve_key(scalars, None, PERFORMANCE_KEYS, role="performance", flag="--performance-key"))
    return series, fit_run(series, fit_fraction=0.5, bootstrap=300, seed=3)


def test_three_sources_give_the_same_points_and_fit(tmp_path):
    data = synthetic_run()
    ours = write_ours(tmp_path / "ours", *data)
    nemo = write_nemo_rl_tensorboard(tmp_path / "nemo", *data)
    table = write_wandb_csv(tmp_path / "export.csv", *data)
    results = {
        "jsonl": fitted(ours),
        "ours-tb": fitted(os.path.join(ours, "tb")),
        "nemo-tb": fitted(nemo),  # found below the experiment directory
        "csv": fitted(table),
    }
    expected_steps = list(range(VAL_PERIOD, STEPS + 1, VAL_PERIOD))
    reference = results["jsonl"][1].to_json()
    for name, (series, law) in results.items():
        assert series.steps.tolist() == expected_steps, name
        assert series.n_steps == STEPS + 1 and series.n_dropped == STEPS + 1 - len(expected_steps), name
        # step 0 has accuracy but no entropy; the 48 steps between validations have entropy only
        assert (series.n_missing_x, series.n_missing_y) == (1, STEPS - len(expected_steps)), name
        out = law.to_json()
        for key in ("a", "b", "ceiling", "rmse_heldout", "rmse_fit", "n_fit", "n_heldout", "a_interval",
                    "b_interval", "ceiling_interval"):
            assert out[key] == reference[key], (name, key)
    assert results["jsonl"][0].source == "jsonl" and results["jsonl"][0].x_key == "entropy_mean"
    assert results["jsonl"][0].y_key == "val_accuracy"
    assert results["ours-tb"][0].x_key == "entropy/entropy_mean" and results["ours-tb"][0].y_key == "val/accuracy"
    assert results["nemo-tb"][0].source == "tensorboard"
    assert (results["nemo-tb"][0].x_key, results["nemo-tb"][0].y_key) == ("train/entropy", "validation/accuracy")
    assert results["csv"][0].source == "csv"


def test_performance_falls_back_to_reward_without_validation(tmp_path):
    entropy, _, reward = synthetic_run()
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as fh:
        for s in range(1, STEPS + 1):
            fh.write(json.dumps({"step": s, "entropy_mean": entropy[s], "reward_mean": reward[s]}) + "\n")
    series, law = fitted(str(path))
    assert series.y_key == "reward_mean" and series.n_points == STEPS and series.n_dropped == 0
    assert law.n_fit == STEPS // 2


def test_non_finite_and_null_values_are_dropped_and_counted(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "entropy_mean": 0.5 - s / 100, "reward_mean": 0.2 + s / 50} for s in range(1, 11)]
    rows[2]["entropy_mean"] = None  # the engine writes non-finite values as null
    del rows[5]["reward_mean"]
    rows[7]["reward_mean"] = float("nan")  # json.dumps writes NaN; a foreign writer might
    rows.append({"step": 11, "loss": 0.1})  # neither value: one dropped step, missing both
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    series = pair_series(read_run(str(path)), "entropy_mean", "reward_mean")
    assert series.steps.tolist() == [1, 2, 4, 5, 7, 9, 10]
    assert (series.n_steps, series.n_dropped, series.n_missing_x, series.n_missing_y) == (11, 4, 2, 3)
    assert "kept 7 of 11 steps; dropped 4" in series.dropped_summary()


def test_torn_last_line_is_ignored_with_a_note_and_a_damaged_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "entropy_mean": 0.5 - s / 100, "reward_mean": s / 10}) for s in range(1, 5)]
    path.write_text("\n".join(good) + '\n{"step": 5, "entro')
    scalars = read_run(str(path))
    assert sorted(scalars.steps) == [1, 2, 3, 4]
    assert any("torn last line (line 5)" in n for n in scalars.notes)
    path.write_text(good[0] + "\nnot json\n" + good[1] + "\n")
    with pytest.raises(LawInputError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_run(str(path))
    path.write_text(json.dumps({"entropy_mean": 0.3}) + "\n")
    with pytest.raises(LawInputError, match=r"metrics\.jsonl:1: no step field 'step'"):
        read_run(str(path))


def test_a_step_logged_twice_keeps_the_later_value_and_says_so(tmp_path):
    path = tmp_path / "run.csv"
    path.write_text("step,entropy,acc\n1,0.5,0.1\n2,0.4,0.2\n2,0.35,0.25\n3,0.3,0.3\n")
    scalars = read_run(str(path))
    assert scalars.values["entropy"][2] == 0.35 and scalars.values["acc"][2] == 0.25
    assert any("more than one row" in n for n in scalars.notes)


def test_missing_keys_name_the_file_the_flag_and_what_is_available(tmp_path):
    data = synthetic_run()
    ours = write_ours(tmp_path / "ours", *data)
    scalars = read_run(ours)
    with pytest.raises(LawInputError) as err:
        resolve_key(scalars, "val_acc", PERFORMANCE_KEYS, role="performance", flag="--performance-key")
    message = str(err.value)
    assert "metrics.jsonl" in message and "'val_acc'" in message and "--performance-key" in message
    assert "'val_accuracy'" in message and "'reward_mean'" in message  # the available keys are listed
    table = tmp_path / "plain.csv"
    table.write_text("step,loss\n1,0.5\n2,0.4\n")
    with pytest.raises(LawInputError, match=r"plain\.csv: none of the default entropy keys .* --entropy-key; "
                                            r"available: 'loss'"):
        resolve_key(read_run(str(table)), None, ENTROPY_KEYS, role="entropy", flag="--entropy-key")


def test_wandb_chart_export_columns_match_by_suffix_and_ambiguity_is_refused(tmp_path):
    data = synthetic_run()
    table = write_wandb_csv(tmp_path / "chart.csv", *data, prefix="grpo-7b - ")
    series, law = fitted(table)
    assert series.x_key == "grpo-7b - train/entropy" and series.y_key == "grpo-7b - validation/accuracy"
    assert law.n_fit + law.n_heldout == STEPS // VAL_PERIOD
    two = tmp_path / "two_runs.csv"
    two.write_text("Step,a - train/entropy,b - train/entropy,a - validation/accuracy\n1,0.5,0.6,0.2\n")
    with pytest.raises(LawInputError, match=r"matches several columns .*a - train/entropy.*b - train/entropy"):
        resolve_key(read_run(str(two)), None, ENTROPY_KEYS, role="entropy", flag="--entropy-key")
    assert resolve_key(read_run(str(two)), "b - train/entropy", ENTROPY_KEYS, role="entropy",
                       flag="--entropy-key") == "b - train/entropy"


def test_csv_errors_name_the_column_and_line(tmp_path):
    no_step = tmp_path / "no_step.csv"
    no_step.write_text("epoch,entropy\n1,0.5\n")
    with pytest.raises(LawInputError, match=r"none of the step columns .* --step-key; columns: 'epoch', 'entropy'"):
        read_run(str(no_step))
    assert sorted(read_run(str(no_step), step_key="epoch").steps) == [1]
    with pytest.raises(LawInputError, match=r"no step column 'iteration' \(--step-key\)"):
        read_run(str(no_step), step_key="iteration")
    text = tmp_path / "text.csv"
    text.write_text("step,entropy,note\n1,0.5,ok\n2,0.4,\n")
    scalars = read_run(str(text))
    assert "note" not in scalars.values
    with pytest.raises(LawInputError, match=r"no entropy key 'note' \(--entropy-key\) \(non-numeric value 'ok' "
                                            r"at line 2\)"):
        resolve_key(scalars, "note", ENTROPY_KEYS, role="entropy", flag="--entropy-key")
    bad_step = tmp_path / "bad_step.csv"
    bad_step.write_text("step,entropy\n1.5,0.5\n")
    with pytest.raises(LawInputError, match=r"bad_step\.csv:2: step 1\.5 is not an integer"):
        read_run(str(bad_step))


def test_source_detection_and_its_errors(tmp_path):
    with pytest.raises(LawInputError, match="no such file or directory"):
        read_run(str(tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LawInputError, match="neither metrics.jsonl nor TensorBoard event files"):
        read_run(str(empty))
    odd = tmp_path / "run.txt"
    odd.write_text("x")
    with pytest.raises(LawInputError, match="cannot tell the source .* --source"):
        read_run(str(odd))
    with pytest.raises(LawInputError, match="source 'parquet' is not one of"):
        read_run(str(odd), source="parquet")
    data = synthetic_run()
    write_nemo_rl_tensorboard(tmp_path / "exp" / "a", *data)
    write_nemo_rl_tensorboard(tmp_path / "exp" / "b", *data)
    with pytest.raises(LawInputError, match=r"several directories .* hold TensorBoard event files; pass one of"):
        read_run(str(tmp_path / "exp"))
    assert read_run(str(tmp_path / "exp" / "a" / "tensorboard")).source == "tensorboard"
    # an event file on its own
    event_dir = tmp_path / "exp" / "a" / "tensorboard"
    event_file = next(event_dir.iterdir())
    assert sorted(read_run(str(event_file)).steps) == list(range(0, STEPS + 1))
    # a run directory with both files reads metrics.jsonl; --source tensorboard reads its events instead
    ours = write_ours(tmp_path / "ours", *data)
    assert read_run(ours).source == "jsonl"
    assert read_run(ours, source="tensorboard").source == "tensorboard"


def test_tensorboard_resumed_without_purge_keeps_the_later_values(tmp_path):
    # A run restarted from step 2 by a second writer in the same directory logs steps 3..5 again.
    from torch.utils.tensorboard import SummaryWriter

    for offset, steps in ((0.0, range(1, 6)), (0.5, range(3, 6))):
        writer = SummaryWriter(str(tmp_path))
        for s in steps:
            writer.add_scalar("train/entropy", 0.25 + offset + s / 64, s)  # exact in float32
        writer.close()
    scalars = read_run(str(tmp_path))
    assert scalars.values["train/entropy"] == {s: 0.25 + (0.5 if s >= 3 else 0.0) + s / 64 for s in range(1, 6)}
    assert any("3 (tag, step) values logged more than once" in n for n in scalars.notes)
