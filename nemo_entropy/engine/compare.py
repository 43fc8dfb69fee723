"""``nemo-entropy compare``: GRPO, Clip-Cov and KL-Cov on the local engine with the same seed, side by side.

Every run shares one warm-start checkpoint (the same initial policy) and the same prompts and sampling
noise (both derive from the seed), so the curves differ only by the loss. Writes ``compare.png`` (entropy,
train reward and validation accuracy against steps), ``compare_summary.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

DEFAULT_CONFIGS = ("local_grpo", "local_clip_cov", "local_kl_cov")


def _window_mean(records: list[dict], key: str, start: int, stop: int) -> Optional[float]:
    values = [r[key] for r in records if start <= r["step"] <= stop and r.get(key) is not None]
    return sum(values) / len(values) if values else None


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Entropy and accuracy figures of one run's metrics (windows of 10% of the run at start and end)."""
    steps = [r["step"] for r in records if r.get("entropy_mean") is not None]
    if not steps:
        return {}
    last = max(steps)
    window = max(1, last // 10)
    val = [(r["step"], r["val_accuracy"]) for r in records if r.get("val_accuracy") is not None]
    return {
        "steps": last,
        "entropy_first": _window_mean(records, "entropy_mean", 1, window),
        "entropy_mid": _window_mean(records, "entropy_mean", last // 2 - window // 2, last // 2 + window // 2),
        "entropy_last": _window_mean(records, "entropy_mean", last - window + 1, last),
        "reward_first": _window_mean(records, "reward_mean", 1, window),
        "reward_last": _window_mean(records, "reward_mean", last - window + 1, last),
        "val_accuracy_start": val[0][1] if val else None,
        "val_accuracy_final": val[-1][1] if val else None,
        "val_accuracy_best": max(v for _, v in val) if val else None,
        "selected_fraction_mean": _window_mean(records, "selected_fraction", 1, last),
        "window": window,
    }


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    """The comparison as a Markdown table (one row per run)."""
    head = ("| run | entropy first 10% | entropy mid | entropy last 10% | reward first 10% | reward last 10% "
            "| val acc start | val acc final | val acc best |")
    rows = [head, "|" + " --- |" * 9]
    for name, s in summaries.items():
        rows.append(
            f"| {name} | {_fmt(s.get('entropy_first'))} | {_fmt(s.get('entropy_mid'))} | {_fmt(s.get('entropy_last'))} "
            f"| {_fmt(s.get('reward_first'))} | {_fmt(s.get('reward_last'))} | {_fmt(s.get('val_accuracy_start'))} "
            f"| {_fmt(s.get('val_accuracy_final'))} | {_fmt(s.get('val_accuracy_best'))} |"
        )
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-entropy compare",
        description="Run GRPO, Clip-Cov and KL-Cov on the local engine with the same seed and plot them side by side.",
        epilog="Extra arguments are Hydra overrides applied to every run, e.g. engine.task.digits=3.",
    )
    parser.add_argument("--out", default="runs/compare", help="output folder (one sub-folder per run)")
    parser.add_argument("--steps", type=int, default=None, help="grpo.max_num_steps of every run (default: the configs')")
    parser.add_argument("--seed", type=int, default=None, help="grpo.seed of every run (default: the configs')")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated config names")
    parser.add_argument("--config-dir", default=None, help="folder of the configs (default: the project's conf/)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of ``nemo-entropy compare``; returns the exit code."""
    args, overrides = _parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        print(f"nemo-entropy compare: unknown option {bad[0]!r} (overrides are key=value)", file=sys.stderr)
        return 2
    from nemo_entropy.train import compose_config

    from .launch import run_local
    from .metrics import read_metrics
    from .plot import plot_comparison
    from .progress import Progress

    out = os.path.abspath(args.out)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    common = list(overrides) + [f"engine.warm_start.cache_dir={os.path.join(out, 'warm_start')}"]
    if args.steps is not None:
        common.append(f"grpo.max_num_steps={args.steps}")
    if args.seed is not None:
        common.append(f"grpo.seed={args.seed}")
    runs: dict[str, str] = {}
    results: dict[str, Any] = {}
    started = time.perf_counter()
    progress = Progress(len(names), "compare", unit="run", every_steps=1)
    for name in names:
        log_dir = os.path.join(out, name)
        try:
            cfg = compose_config(name, common + [f"logger.log_dir={log_dir}"], args.config_dir)
        except ValueError as err:
            print(f"nemo-entropy compare: invalid config: {err}", file=sys.stderr)
            return 2
        print(f"[nemo-entropy compare] {name} -> {log_dir}", flush=True)
        result = run_local(cfg)
        runs[name] = result["metrics_path"]
        results[name] = {"seconds": round(result["seconds"], 1), "metrics_path": result["metrics_path"]}
        progress.update(1, last=name)
    progress.close()
    summaries = {name: summarise(read_metrics(path)) for name, path in runs.items()}
    png = plot_comparison(runs, os.path.join(out, "compare.png"),
                          title="local engine: " + " vs ".join(names) + " (same seed, same warm start)")
    command = "nemo-entropy compare " + " ".join(list(argv if argv is not None else sys.argv[1:]))
    with open(os.path.join(out, "compare_summary.json"), "w") as fh:
        json.dump({"command": command, "runs": results, "summary": summaries}, fh, indent=2)
    table = markdown_table(summaries)
    with open(os.path.join(out, "compare.md"), "w") as fh:
        fh.write(f"`{command}`\n\n{table}\n")
    print(table)
    print(f"[nemo-entropy compare] {len(names)} runs in {time.perf_counter() - started:.0f} s")
    print(f"[nemo-entropy compare] plot:    {png}")
    print(f"[nemo-entropy compare] summary: {os.path.join(out, 'compare_summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
