"""The plot of ``nemo-entropy law fit``: performance against entropy with each run's fitted law.

One colour per run; filled circles are the fitted points, crosses the held-out points the fit predicts.
The law is drawn solid over the entropy range of the run and dashed from there down to ``H = 0``, where a
diamond marks the predicted ceiling ``b - a``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .heldout import RunLaw


def default_plot_path(run_path: str) -> str:
    """``law_fit.png`` inside a run directory, or ``<name>_law_fit.png`` next to a file."""
    if os.path.isdir(run_path):
        return os.path.join(run_path, "law_fit.png")
    stem = os.path.splitext(os.path.basename(run_path))[0]
    return os.path.join(os.path.dirname(os.path.abspath(run_path)), f"{stem}_law_fit.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; also safe on a head node without X
    import matplotlib.pyplot as plt

    return plt


def short_labels(paths: Sequence[str]) -> list[str]:
    """Run labels without the directories every run shares (``.../local_grpo/seed_42`` -> ``local_grpo/seed_42``)."""
    parts = [os.path.normpath(p).split(os.sep) for p in paths]
    common = 0
    while len(parts) > 1 and all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    if len(parts) == 1:
        common = max(0, len(parts[0]) - 2)
    return [os.sep.join(p[common:]) for p in parts]


def plot_laws(laws: Sequence[RunLaw], out_png: str, labels: Sequence[str]) -> str:
    """Write the plot of ``laws`` (one label per run) to ``out_png`` and return the path. One legend entry per run
    (its law, ceiling and held-out error); dots are the fitted points, crosses the held-out ones, diamonds the
    ceilings."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (law, label) in enumerate(zip(laws, short_labels(list(labels)))):
        colour = colours[i % len(colours)]
        s, fit = law.series, law.fit
        ax.scatter(s.x[law.split.fit], s.y[law.split.fit], color=colour, s=18)
        heldout = ""
        if law.n_heldout:
            ax.scatter(s.x[law.split.heldout], s.y[law.split.heldout], color=colour, marker="x", s=22)
            heldout = f", held-out RMSE {law.rmse_heldout:.3g}"
        h_low, h_high = float(s.x.min()), float(s.x.max())
        grid = np.linspace(h_low, h_high, 200)
        ax.plot(grid, fit.predict(grid), color=colour,
                label=f"{label}: a={fit.a:.3g}, b={fit.b:.3g}, ceiling {fit.ceiling:.3g}{heldout}")
        if h_low > 0:
            tail = np.linspace(0.0, h_low, 50)
            ax.plot(tail, fit.predict(tail), color=colour, linestyle="--", linewidth=1)
        ax.scatter([0.0], [fit.ceiling], color=colour, marker="D", s=30)
    ax.scatter([], [], color="grey", s=18, label="fitted points")
    ax.scatter([], [], color="grey", marker="x", s=22, label="held-out points")
    ax.scatter([], [], color="grey", marker="D", s=30, label="ceiling -a + b (H = 0)")
    ax.set_xlabel("entropy H (nats)")
    ax.set_ylabel("performance R")
    ax.set_title("entropy-performance law  R = -a exp(H) + b")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
