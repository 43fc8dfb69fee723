"""``nemo-entropy compare``: several configs (default GRPO, Clip-Cov, KL-Cov) over several seeds on the local engine.

Every (config, seed) pair is one local run in ``OUT/<config>/seed_<seed>/``; the runs of one seed share a
warm-start checkpoint (the same initial policy) and the same prompts and sampling noise (both derive from the
seed), so within a seed the curves differ only by the loss. Over seeds, each method gets the mean and a 95%
Student-t interval of its final entropy (mean of the last 10% of steps), final train reward (same window),
final greedy validation accuracy and end-of-run pass@k, as a printed Markdown table, ``compare.md`` and
``compare_summary.json``, and ``compare.png`` (entropy, train reward and validation accuracy against steps:
mean over seeds with the interval as a band).

Resumable: a finished run leaves ``result.json`` in its folder and is not run again; an interrupted run
resumes from its last checkpoint. A folder holding a run of a different configuration is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from ..compose import compose_config
from .intervals import mean_interval
from .launch import run_local
from .metrics import read_metrics
from .plot import plot_seed_bands
from .progress import Progress
from .run_folder import EngineExit
from .settings import EngineSettings

DEFAULT_CONFIGS = ("local_grpo", "local_clip_cov", "local_kl_cov")
DEFAULT_NUM_SEEDS = 5
RESULT_FILE = "result.json"
SUMMARY_KEYS = ("entropy_final", "reward_final", "val_accuracy_final")


# ----------------------------------------------------------------------------------------------- one run
def _window_mean(records: list[dict], key: str, start: int, stop: int) -> Optional[float]:
    values = [r[key] for r in records if start <= r["step"] <= stop and r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _per_optimizer_step(records: list[dict], key: str) -> Optional[float]:
    values = [r[key] / r["optimizer_steps"] for r in records if r.get(key) is not None and r.get("optimizer_steps")]
    return sum(values) / len(values) if values else None


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Entropy, reward, accuracy and pass@k figures of one run's metrics (windows of 10% of the run)."""
    steps = [r["step"] for r in records if r.get("entropy_mean") is not None]
    if not steps:
        return {}
    last = max(steps)
    window = max(1, last // 10)
    val = [(r["step"], r["val_accuracy"]) for r in records if r.get("val_accuracy") is not None]
    final = [r for r in records if r["step"] == last][-1]
    out = {
        "steps": last,
        "window": window,
        "entropy_start": next(r["entropy_mean"] for r in records if r.get("entropy_mean") is not None),
        "entropy_first": _window_mean(records, "entropy_mean", 1, window),
        "entropy_final": _window_mean(records, "entropy_mean", last - window + 1, last),
        "reward_first": _window_mean(records, "reward_mean", 1, window),
        "reward_final": _window_mean(records, "reward_mean", last - window + 1, last),
        "val_accuracy_start": val[0][1] if val else None,
        "val_accuracy_final": val[-1][1] if val else None,
        "val_accuracy_best": max(v for _, v in val) if val else None,
        "selected_tokens_per_optimizer_step_mean": _per_optimizer_step(records, "selected_tokens"),
        "valid_tokens_per_optimizer_step_mean": _window_mean(records, "valid_tokens_per_optimizer_step", 1, last),
        "response_length_mean": _window_mean(records, "response_length_mean", 1, last),
    }
    out.update({k: v for k, v in final.items() if k.startswith("pass@")})
    return out


def aggregate(per_seed: dict[int, dict[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and t-interval over seeds of every summary figure (final entropy, reward, accuracy, pass@k)."""
    keys = list(SUMMARY_KEYS) + sorted({k for s in per_seed.values() for k in s if k.startswith("pass@")},
                                       key=lambda k: int(k[5:]))
    keys += ["entropy_start", "val_accuracy_start", "selected_tokens_per_optimizer_step_mean", "valid_tokens_per_optimizer_step_mean"]
    return {k: mean_interval([s.get(k) for s in per_seed.values()], confidence) for k in keys}


PAIRED_KEYS = ("entropy_final", "reward_final", "val_accuracy_final")


def paired_differences(per_config: dict[str, dict[int, dict[str, Any]]], baseline: str,
                       confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Per method other than ``baseline``: the seed-paired differences ``method - baseline`` of the final entropy,
    reward, accuracy and every pass@k, with their mean and two-sided Student-t interval over the seeds both ran
    (a paired t-interval: the seed's shared warm start, prompts and sampling noise cancel in the difference)."""
    base = per_config[baseline]
    out: dict[str, dict[str, Any]] = {}
    for name, seeds in per_config.items():
        if name == baseline:
            continue
        common = sorted(set(seeds) & set(base))
        keys = list(PAIRED_KEYS) + sorted({k for s in seeds.values() for k in s if k.startswith("pass@")},
                                          key=lambda k: int(k[5:]))
        stats = {}
        for key in keys:
            diffs = [seeds[s][key] - base[s][key] for s in common
                     if seeds[s].get(key) is not None and base[s].get(key) is not None]
            stats[key] = {**mean_interval(diffs, confidence), "differences": diffs}
        out[name] = {"seeds": common, "stats": stats}
    return out


def _excludes_zero(stat: dict[str, Any]) -> str:
    if stat.get("low") is None:
        return ""
    return " *" if stat["low"] > 0 or stat["high"] < 0 else ""


def paired_table(paired: dict[str, dict[str, Any]], baseline: str, pass_ks: Sequence[int] = (1, 8, 64)) -> str:
    """One row per method: mean difference to ``baseline`` and its paired t-interval ``[low, high]``; ``*`` marks an
    interval that excludes 0."""
    present = [k for k in pass_ks if any(f"pass@{k}" in p["stats"] for p in paired.values())]
    head = ["method - " + baseline, "seeds", "final entropy", "final train reward", "final val. accuracy"]
    head += [f"pass@{k}" for k in present]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    for name, p in paired.items():
        stats = p["stats"]
        cells = [name, str(len(p["seeds"]))] + [_fmt(stats.get(k, {}), paired=True) for k in PAIRED_KEYS]
        cells += [_fmt(stats.get(f"pass@{k}", {}), paired=True) for k in present]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _fmt(stat: dict[str, Any], paired: bool = False) -> str:
    """``mean ± half`` (``paired``: a signed difference and its interval ``[low, high]``, ``*`` if it excludes 0);
    the mean alone without an interval, ``-`` without a value."""
    if stat.get("mean") is None:
        return "-"
    sign = "+" if paired else ""
    if stat.get("half") is None:
        return f"{stat['mean']:{sign}.3f}"
    if paired:
        return f"{stat['mean']:+.3f} [{stat['low']:+.3f}, {stat['high']:+.3f}]{_excludes_zero(stat)}"
    return f"{stat['mean']:.3f} ± {stat['half']:.3f}"


def markdown_table(aggregates: dict[str, dict[str, Any]], pass_ks: Sequence[int] = (1, 8, 64)) -> str:
    """One row per method: mean ± half-width of the 95% t-interval over seeds."""
    present = [k for k in pass_ks if any(f"pass@{k}" in a for a in aggregates.values())]
    head = ["method", "seeds", "final entropy (nats)", "final train reward", "final val. accuracy (greedy)"]
    head += [f"pass@{k}" for k in present]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, agg in aggregates.items():
        cells = [name, str(agg["entropy_final"]["n"]), _fmt(agg["entropy_final"]), _fmt(agg["reward_final"]),
                 _fmt(agg["val_accuracy_final"])]
        cells += [_fmt(agg.get(f"pass@{k}", {})) for k in present]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- running
MAX_SEED_COUNT = 20


def parse_seeds(text: str, base: int) -> list[int]:
    """``"5"`` -> five seeds ``base .. base + 4``; ``"1,2,3"`` (any comma, also ``"42,"``) -> those seeds.

    A count above :data:`MAX_SEED_COUNT` is refused: ``--seeds 42`` is far more likely meant as seed 42.
    """
    text = text.strip()
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            count = int(text)
            if count < 1:
                raise ValueError
            seeds = list(range(base, base + count))
    except ValueError:
        raise ValueError(f"--seeds {text!r} is invalid: a count >= 1 (e.g. 5) or a comma-separated list (e.g. 1,2,3)")
    if "," not in text and len(seeds) > MAX_SEED_COUNT:
        raise ValueError(f"--seeds {text} is invalid: a count must be in [1, {MAX_SEED_COUNT}]; for the single seed "
                         f"{text} write --seeds {text}, (a list) or --seed {text} --seeds 1")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} is invalid: seeds must be distinct and at least one")
    return seeds


def config_fingerprint(cfg_dict: dict[str, Any]) -> str:
    """A hash of a run's resolved config, without the keys that only change how it is displayed."""
    plain = json.loads(json.dumps(cfg_dict, default=str))
    engine = plain.get("engine", {})
    for key in ("progress_bar", "plot"):
        engine.pop(key, None)
    return hashlib.blake2b(json.dumps(plain, sort_keys=True).encode(), digest_size=8).hexdigest()


def _read_result(run_dir: str) -> Optional[dict[str, Any]]:
    path = os.path.join(run_dir, RESULT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _write_result(run_dir: str, result: dict[str, Any]) -> None:
    path = os.path.join(run_dir, RESULT_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, path)


def _subprocess_command(name: str, overrides: list[str], config_dir: Optional[str]) -> list[str]:
    cmd = [sys.executable, "-m", "nemo_entropy.train", "--config-name", name]
    if config_dir:
        cmd += ["--config-dir", config_dir]
    return cmd + overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-entropy compare",
        description="Run several configs (default GRPO, Clip-Cov, KL-Cov) over several seeds on the local engine; "
                    "report mean and 95% t-interval per method and plot the curves with bands.",
        epilog="Extra arguments are Hydra overrides applied to every run, e.g. grpo.max_num_steps=100.",
    )
    parser.add_argument("--out", default="runs/compare", help="output folder (OUT/<config>/seed_<seed>/ per run)")
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated config names")
    parser.add_argument("--seeds", default=str(DEFAULT_NUM_SEEDS),
                        help="a count N <= 20 (seeds SEED .. SEED+N-1, SEED from --seed) or a comma-separated list such as "
                             "42,43 or 42, (default 5)")
    parser.add_argument("--seed", type=int, default=None,
                        help="first seed when --seeds is a count (default: the first config's grpo.seed)")
    parser.add_argument("--steps", type=int, default=None, help="grpo.max_num_steps of every run (default: the configs')")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (default 1: in this process; 2 on a 2-core machine: subprocesses)")
    parser.add_argument("--confidence", type=float, default=0.95, help="level of the t-intervals (default 0.95)")
    parser.add_argument("--baseline", default=None,
                        help="config the paired differences are taken against (default: local_grpo when listed, "
                             "else the first config)")
    parser.add_argument("--config-dir", default=None, help="folder of the configs (default: the project's conf/)")
    return parser


def _or_nan(value: Any) -> float:
    """A summary value for printing: NaN when missing (0.0 is a value, not a missing one)."""
    return float("nan") if value is None else float(value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of ``nemo-entropy compare``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = _parser().parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        print(f"nemo-entropy compare: unknown option {bad[0]!r} (overrides are key=value)", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"nemo-entropy compare: --jobs={args.jobs} is invalid: expected an integer >= 1", file=sys.stderr)
        return 2
    if not 0 < args.confidence < 1:
        print(f"nemo-entropy compare: --confidence={args.confidence} is invalid: expected 0 < c < 1", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if not names:
        print("nemo-entropy compare: --configs is empty", file=sys.stderr)
        return 2
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        print(f"nemo-entropy compare: --configs {args.configs!r} names {', '.join(repeated)} more than once: its runs "
              f"would share the folders OUT/<config>/seed_<seed>; list each config once", file=sys.stderr)
        return 2
    baseline = args.baseline or ("local_grpo" if "local_grpo" in names else names[0])
    if baseline not in names:
        print(f"nemo-entropy compare: --baseline {baseline} is not one of --configs {','.join(names)}", file=sys.stderr)
        return 2
    common = list(overrides) + [f"engine.warm_start.cache_dir={os.path.join(out, 'warm_start')}"]
    if args.steps is not None:
        common.append(f"grpo.max_num_steps={args.steps}")
    try:
        base = args.seed if args.seed is not None else int(
            OmegaConf.select(compose_config(names[0], list(overrides), args.config_dir), "grpo.seed", default=42))
        seeds = parse_seeds(args.seeds, base)
    except ValueError as err:
        print(f"nemo-entropy compare: {err}", file=sys.stderr)
        return 2

    # Every (config, seed) pair, config-major: with --jobs 2 the two concurrent runs have different seeds, so
    # they never train the same warm start twice.
    plan = []
    for name in names:
        for seed in seeds:
            run_dir = os.path.join(out, name, f"seed_{seed}")
            run_overrides = common + [f"grpo.seed={seed}", f"logger.log_dir={run_dir}"]
            try:
                cfg = OmegaConf.to_container(compose_config(name, run_overrides, args.config_dir), resolve=True)
                EngineSettings.from_config(cfg)
            except ValueError as err:
                print(f"nemo-entropy compare: invalid config {name}: {err}", file=sys.stderr)
                return 2
            fingerprint = config_fingerprint(cfg)
            done = _read_result(run_dir)
            if done is not None and done.get("fingerprint") != fingerprint:
                print(f"nemo-entropy compare: {run_dir} holds a finished run of a different configuration "
                      f"(fingerprint {done.get('fingerprint')} != {fingerprint}); use another --out or delete it",
                      file=sys.stderr)
                return 2
            plan.append({"name": name, "seed": seed, "dir": run_dir, "overrides": run_overrides,
                         "fingerprint": fingerprint, "done": done is not None})

    total = len(plan)
    todo = [p for p in plan if not p["done"]]
    started = time.perf_counter()
    print(f"[nemo-entropy compare] {len(names)} configs x {len(seeds)} seeds = {total} runs "
          f"({total - len(todo)} already finished) -> {out}", flush=True)
    # Counts and time left on stderr (a bar on a terminal, plain lines in a log); each finished run's figures on stdout.
    progress = Progress(total, "compare", unit="run", initial=total - len(todo), every_steps=1)

    def report(item: dict[str, Any], seconds: float) -> None:
        summary = summarise(read_metrics(os.path.join(item["dir"], "metrics.jsonl")))
        _write_result(item["dir"], {"config": item["name"], "seed": item["seed"], "fingerprint": item["fingerprint"],
                                    "seconds": round(seconds, 1), "overrides": item["overrides"], "summary": summary})
        print(f"[nemo-entropy compare] {item['name']} seed {item['seed']} finished in {seconds:.0f} s: "
              f"final entropy {summary.get('entropy_final', float('nan')):.3f}, "
              f"val. accuracy {_or_nan(summary.get('val_accuracy_final')):.3f}, "
              f"pass@1 {summary.get('pass@1', float('nan')):.3f}", flush=True)
        progress.update(1, last=f"{item['name']}/seed_{item['seed']}")

    if args.jobs == 1:
        for item in todo:
            print(f"[nemo-entropy compare] {item['name']} seed {item['seed']} -> {item['dir']}", flush=True)
            t0 = time.perf_counter()
            try:
                run_local(compose_config(item["name"], item["overrides"], args.config_dir))
            except EngineExit as err:
                print(f"nemo-entropy compare: {item['name']} seed {item['seed']}: {err}", file=sys.stderr)
                return err.exit_code
            report(item, time.perf_counter() - t0)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        running: list[tuple[dict[str, Any], subprocess.Popen, float, Any]] = []
        queue = list(todo)
        failed = []
        while queue or running:
            while queue and len(running) < args.jobs:
                item = queue.pop(0)
                os.makedirs(item["dir"], exist_ok=True)
                log = open(os.path.join(item["dir"], "train.log"), "a")
                proc = subprocess.Popen(_subprocess_command(item["name"], item["overrides"], args.config_dir),
                                        stdout=log, stderr=subprocess.STDOUT, env=env)
                print(f"[nemo-entropy compare] started {item['name']} seed {item['seed']} (pid {proc.pid}, "
                      f"log {os.path.join(item['dir'], 'train.log')})", flush=True)
                running.append((item, proc, time.perf_counter(), log))
            time.sleep(1.0)
            for entry in list(running):
                item, proc, t0, log = entry
                if proc.poll() is None:
                    continue
                running.remove(entry)
                log.close()
                if proc.returncode == 0:
                    report(item, time.perf_counter() - t0)
                else:
                    failed.append(item)
                    print(f"[nemo-entropy compare] {item['name']} seed {item['seed']} failed (exit {proc.returncode}); "
                          f"see {os.path.join(item['dir'], 'train.log')}", file=sys.stderr, flush=True)
        if failed:
            progress.close()
            print(f"[nemo-entropy compare] {len(failed)} run(s) failed; re-run the same command to retry them",
                  file=sys.stderr)
            return 1
    progress.close()

    per_config: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in names}
    metrics_paths: dict[str, dict[int, str]] = {name: {} for name in names}
    for item in plan:
        path = os.path.join(item["dir"], "metrics.jsonl")
        per_config[item["name"]][item["seed"]] = summarise(read_metrics(path))
        metrics_paths[item["name"]][item["seed"]] = path
    aggregates = {name: aggregate(per_config[name], args.confidence) for name in names}
    png = plot_seed_bands(metrics_paths, os.path.join(out, "compare.png"), confidence=args.confidence,
                          title=f"local engine: mean and {args.confidence:.0%} t-interval over seeds {seeds}")
    command = "nemo-entropy compare " + " ".join(argv)
    table = markdown_table(aggregates)
    paired = paired_differences(per_config, baseline, args.confidence) if len(names) > 1 else {}
    pairs = paired_table(paired, baseline) if paired else ""
    with open(os.path.join(out, "compare_summary.json"), "w") as fh:
        json.dump({"command": command, "seeds": seeds, "configs": names, "confidence": args.confidence,
                   "baseline": baseline, "aggregate": aggregates, "paired": paired, "per_seed": per_config}, fh, indent=2)
    with open(os.path.join(out, "compare.md"), "w") as fh:
        fh.write(f"`{command}`\n\nMean ± half-width of the {args.confidence:.0%} Student-t interval over seeds "
                 f"{seeds}; entropy and reward: mean of the last 10% of steps; accuracy: greedy, last validation; "
                 f"pass@k: end of run.\n\n{table}\n")
        if pairs:
            fh.write(f"\nSeed-paired differences against {baseline}: mean [{args.confidence:.0%} paired Student-t "
                     f"interval]; * marks an interval that excludes 0.\n\n{pairs}\n")
    print(table)
    if pairs:
        print(f"\nseed-paired differences against {baseline} (mean [{args.confidence:.0%} paired t-interval], "
              f"* excludes 0):")
        print(pairs)
    print(f"[nemo-entropy compare] {len(todo)} runs in {time.perf_counter() - started:.0f} s "
          f"({total - len(todo)} reused)")
    print(f"[nemo-entropy compare] plot:    {png}")
    print(f"[nemo-entropy compare] table:   {os.path.join(out, 'compare.md')}")
    print(f"[nemo-entropy compare] summary: {os.path.join(out, 'compare_summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
