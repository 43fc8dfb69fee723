"""``nemo-entropy law fit`` / ``law diagnose`` through the top-level command: the --json contract (one object,
the contract keys, the same numbers as the library), several runs with the agreement, the table, the plot,
and bad flags or missing keys rejected with exit code 2 and a message naming them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nemo_entropy.cli import main
from nemo_entropy.law import fit_law, pair_series, read_run
from tests.test_law_fit import draw_law

CONTRACT = {"a", "b", "ceiling", "rmse_heldout", "n_fit", "n_heldout"}


def write_jsonl(path, h, r, *, val_period=1, extra=None):
    """Our format: entropy every step from 1, val_accuracy every val_period steps, one record per step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i, (hh, rr) in enumerate(zip(h, r)):
            step = i + 1
            record = {"step": step, "entropy_mean": float(hh), "reward_mean": 0.5}
            if step % val_period == 0:
                record["val_accuracy"] = float(rr)
            if extra:
                record.update(extra(step))
            fh.write(json.dumps(record) + "\n")
    return str(path)


def run_cli(capsys, *args):
    code = main(["law", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def run_dir(tmp_path):
    h, r = draw_law(90, seed=5)
    write_jsonl(tmp_path / "grpo" / "metrics.jsonl", h, r)
    return tmp_path / "grpo"


def test_json_single_run_is_one_object_with_the_contract(run_dir, capsys):
    code, out, err = run_cli(capsys, "fit", run_dir, "--json", "--fit-steps", 30, "--bootstrap", 200)
    assert code == 0
    result = json.loads(out)  # the whole of stdout is one JSON document
    assert isinstance(result, dict) and CONTRACT <= set(result)
    assert (result["n_fit"], result["n_heldout"]) == (30, 60)
    assert result["entropy_key"] == "entropy_mean" and result["performance_key"] == "val_accuracy"
    # the numbers are those of a direct fit of the first 30 points
    series = pair_series(read_run(str(run_dir)), "entropy_mean", "val_accuracy")
    direct = fit_law(series.x[:30], series.y[:30])
    assert result["a"] == pytest.approx(direct.a, rel=1e-12) and result["b"] == pytest.approx(direct.b, rel=1e-12)
    assert result["ceiling"] == pytest.approx(direct.b - direct.a, rel=1e-12)
    predicted = -direct.a * np.exp(series.x[30:]) + direct.b
    assert result["rmse_heldout"] == pytest.approx(math.sqrt(np.mean((predicted - series.y[30:]) ** 2)), rel=1e-12)
    assert result["plot"] == str(run_dir / "law_fit.png")
    assert (run_dir / "law_fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "kept all 90 steps" in err


def test_dropped_steps_are_reported_in_both_modes(tmp_path, capsys):
    h, r = draw_law(60, seed=1)
    run = write_jsonl(tmp_path / "r" / "metrics.jsonl", h, r, val_period=3)
    code, out, err = run_cli(capsys, "fit", run, "--json", "--no-plot", "--bootstrap", 0)
    result = json.loads(out)
    assert code == 0 and result["n_dropped"] == 40 and result["n_missing_performance"] == 40
    assert result["n_fit"] + result["n_heldout"] == 20 and result["a_interval"] is None
    assert "dropped 40" in err
    code, out, _ = run_cli(capsys, "fit", run, "--no-plot", "--bootstrap", 0)
    assert code == 0 and "kept 20 of 60 steps; dropped 40" in out


def test_table_and_several_runs_with_agreement(tmp_path, capsys):
    runs = []
    for name, (a, b, seed) in {"grpo": (0.6, 0.95, 1), "rloo": (0.6, 0.95, 2), "other": (0.3, 0.7, 3)}.items():
        h, r = draw_law(120, a=a, b=b, noise=0.02, seed=seed)
        runs.append(write_jsonl(tmp_path / name / "metrics.jsonl", h, r))
    code, out, _ = run_cli(capsys, "fit", runs[0], runs[1], "--fit-fraction", "1", "--no-plot")
    assert code == 0 and "the runs AGREE on the law" in out
    assert out.count("metrics.jsonl") >= 2 and "a [95% CI]" in out
    plot = tmp_path / "plots" / "all.png"
    code, out, _ = run_cli(capsys, "fit", *runs, "--fit-fraction", "1/2", "--json", "--plot", plot)
    result = json.loads(out)
    assert code == 0 and set(result) == {"runs", "agreement", "plot"}
    assert [r["run"] for r in result["runs"]] == runs and all(CONTRACT <= set(r) for r in result["runs"])
    assert result["agreement"]["agree"] is False and "rule" in result["agreement"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    code, out, _ = run_cli(capsys, "fit", *runs, "--fit-fraction", "1/2", "--no-plot")
    assert "DO NOT AGREE" in out and "do not overlap" in out


@pytest.mark.parametrize("flags,message", [
    (["--fit-fraction", "0"], r"--fit-fraction must be in (0, 1]; got 0"),
    (["--fit-fraction", "1.5"], r"--fit-fraction must be in (0, 1]; got 1.5"),
    (["--fit-fraction", "half"], "argument --fit-fraction: 'half' is not a number or a fraction"),
    (["--fit-steps", "0"], "--fit-steps must be an integer >= 1; got 0"),
    (["--fit-steps", "3", "--fit-fraction", "0.5"], "argument --fit-fraction: not allowed with argument --fit-steps"),
    (["--heldout-fraction", "1"], "--heldout-fraction must be in (0, 1); got 1"),
    (["--bootstrap", "10"], "--bootstrap must be 0 (no intervals) or >= 100; got 10"),
    (["--source", "parquet"], "argument --source: invalid choice: 'parquet'"),
    (["--plot", "x.png", "--no-plot"], "argument --no-plot: not allowed with argument --plot"),
])
def test_bad_flags_exit_2_naming_the_flag(run_dir, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["law", "fit", str(run_dir), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (run_dir / "law_fit.png").exists()  # rejected before anything was read or written


def test_several_runs_need_intervals(run_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["law", "fit", str(run_dir), str(run_dir), "--bootstrap", "0"])
    assert exit_info.value.code == 2 and "--bootstrap 0 leaves no intervals" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--performance-key", "val_acc"], "no performance key 'val_acc' (--performance-key); available: "),
    (["--entropy-key", "entropy"], "no entropy key 'entropy' (--entropy-key); available: "),
    (["--fit-steps", "2"], "the fit part (steps <= 2) holds 2 of the run's 90 points; the law needs at least 3"),
])
def test_missing_keys_and_too_few_points_exit_2_naming_them(run_dir, capsys, flags, message):
    code, out, err = run_cli(capsys, "fit", run_dir, "--no-plot", *flags)
    assert code == 2 and out == ""
    assert message in err and "metrics.jsonl" in err


def test_constant_entropy_is_refused_by_name(tmp_path, capsys):
    run = write_jsonl(tmp_path / "flat" / "metrics.jsonl", [0.4] * 12, np.linspace(0.1, 0.5, 12))
    code, _, err = run_cli(capsys, "fit", run, "--no-plot")
    assert code == 2 and "entropy is constant (H = 0.4" in err


def test_unknown_path_is_named(tmp_path, capsys):
    code, _, err = run_cli(capsys, "fit", tmp_path / "nope")
    assert code == 2 and "nope: no such file or directory" in err


def test_diagnose_prints_correlation_n_and_keys(tmp_path, capsys):
    rng = np.random.default_rng(0)
    predicted = rng.normal(0, 0.01, size=40)
    entropy = np.concatenate([[0.5], 0.5 + np.cumsum(0.8 * predicted[:-1] + rng.normal(0, 0.002, size=39))])
    run = write_jsonl(tmp_path / "d" / "metrics.jsonl", entropy, np.zeros(40),
                      extra=lambda step: {"entropy_change_predicted": float(predicted[step - 1])})
    code, out, _ = run_cli(capsys, "diagnose", run, "--json")
    result = json.loads(out)
    assert code == 0 and result["n"] == 39
    assert (result["entropy_key"], result["prediction_key"]) == ("entropy_mean", "entropy_change_predicted")
    observed = np.diff(entropy)
    assert result["correlation"] == pytest.approx(np.corrcoef(observed, predicted[:-1])[0, 1], rel=1e-12)
    code, out, _ = run_cli(capsys, "diagnose", run)
    assert code == 0 and f"correlation {result['correlation']:.4f} over n = 39 pairs" in out
    assert "'entropy_change_predicted'" in out and "'entropy_mean'" in out


def test_diagnose_without_the_prediction_names_the_key_and_flag(run_dir, capsys):
    code, _, err = run_cli(capsys, "diagnose", run_dir)
    assert code == 2
    assert "none of the default predicted entropy change keys ['entropy_change_predicted'" in err
    assert "--prediction-key" in err and "'entropy_mean'" in err
    code, _, err = run_cli(capsys, "diagnose", run_dir, "--prediction-key", "cov")
    assert code == 2 and "no predicted entropy change key 'cov' (--prediction-key)" in err


def test_law_is_listed_and_every_flag_has_help(capsys):
    import argparse

    from nemo_entropy.law.cli import _parser

    assert main(["--help"]) == 0
    assert "  law " in capsys.readouterr().out
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"fit", "diagnose"}
    for name, sub in commands.items():
        options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        assert len(options) >= 5, name
        for action in options + [a for a in sub._actions if not a.option_strings]:
            assert action.help and len(action.help) > 10, (name, action.dest)
