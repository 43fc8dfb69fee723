"""PNG plots of local runs: entropy and accuracy against steps, for one run or side by side for several."""

from __future__ import annotations

import os
from typing import Mapping

from .intervals import mean_interval
from .metrics import read_metrics


def _series(records, key):
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(metrics_path: str, out_png: str, title: str = "") -> str:
    """Entropy (mean and p10-p90 band) and reward / validation accuracy against RL steps."""
    plt = _pyplot()
    records = read_metrics(metrics_path)
    fig, (ax_h, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    steps, mean = _series(records, "entropy_mean")
    ax_h.plot(steps, mean, label="entropy (mean)")
    band = [r for r in records if r.get("entropy_p10") is not None and r.get("entropy_p90") is not None]
    if band:
        ax_h.fill_between([r["step"] for r in band], [r["entropy_p10"] for r in band],
                          [r["entropy_p90"] for r in band], alpha=0.2, label="p10-p90")
    ax_h.set_xlabel("RL step")
    ax_h.set_ylabel("token entropy (nats)")
    ax_h.legend()
    for key, label in (("reward_mean", "train reward"), ("val_accuracy", "validation accuracy (greedy)")):
        xs, ys = _series(records, key)
        ax_r.plot(xs, ys, marker="o" if key.startswith("val") else None, markersize=3, label=label)
    ax_r.set_xlabel("RL step")
    ax_r.set_ylabel("accuracy")
    ax_r.set_ylim(-0.02, 1.02)
    ax_r.legend()
    fig.suptitle(title or os.path.dirname(os.path.abspath(metrics_path)))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_comparison(runs: Mapping[str, str], out_png: str, title: str = "") -> str:
    """Entropy, train reward and validation accuracy of several runs (name -> metrics.jsonl) side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("entropy_mean", "token entropy (nats)"), ("reward_mean", "train reward"),
              ("val_accuracy", "validation accuracy (greedy)"))
    for name, path in runs.items():
        records = read_metrics(path)
        for ax, (key, label) in zip(axes, panels):
            xs, ys = _series(records, key)
            ax.plot(xs, ys, label=name, marker="o" if key.startswith("val") else None, markersize=3)
            ax.set_xlabel("RL step")
            ax.set_ylabel(label)
    return _save(plt, fig, axes, title, out_png)


def _save(plt, fig, axes, title: str, out_png: str) -> str:
    """Accuracy panels on [0, 1], the legend, the title; write the PNG and close the figure."""
    for ax in axes[1:]:
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def seed_bands(series: Mapping[int, tuple[list, list]], confidence: float = 0.95):
    """Steps present in every seed's series, with the mean and t-interval over seeds at each step."""
    common = None
    for xs, _ in series.values():
        common = set(xs) if common is None else common & set(xs)
    steps = sorted(common or [])
    lookup = {seed: dict(zip(xs, ys)) for seed, (xs, ys) in series.items()}
    mean, low, high = [], [], []
    for step in steps:
        stat = mean_interval([lookup[seed][step] for seed in lookup], confidence)
        mean.append(stat["mean"])
        half = stat["half"] or 0.0
        low.append(stat["mean"] - half)
        high.append(stat["mean"] + half)
    return steps, mean, low, high


def plot_seed_bands(runs: Mapping[str, Mapping[int, str]], out_png: str, *, confidence: float = 0.95,
                    title: str = "") -> str:
    """Entropy, train reward and validation accuracy of several methods (name -> seed -> metrics.jsonl):
    the mean over seeds with the t-interval as a band."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    panels = (("entropy_mean", "token entropy (nats)"), ("reward_mean", "train reward (sampled accuracy)"),
              ("val_accuracy", "validation accuracy (greedy)"))
    for name, seeds in runs.items():
        records = {seed: read_metrics(path) for seed, path in seeds.items()}
        for ax, (key, label) in zip(axes, panels):
            steps, mean, low, high = seed_bands({seed: _series(recs, key) for seed, recs in records.items()}, confidence)
            if not steps:
                continue
            line = ax.plot(steps, mean, label=f"{name} ({len(seeds)} seeds)",
                           marker="o" if key.startswith("val") else None, markersize=2)[0]
            ax.fill_between(steps, low, high, alpha=0.2, color=line.get_color())
            ax.set_xlabel("RL step")
            ax.set_ylabel(label)
    return _save(plt, fig, axes, title, out_png)
