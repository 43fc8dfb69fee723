"""``nemo-entropy law``: fit the entropy-performance law to runs, and the entropy-change diagnostic.

    nemo-entropy law fit RUN [RUN ...]   fit R = -a exp(H) + b, predict the held-out steps, compare runs
    nemo-entropy law diagnose RUN        correlation of the observed entropy change with the predicted one

A RUN is our run directory (or its metrics.jsonl), a TensorBoard directory (NeMo-RL's
``<log_dir>/tensorboard``), or a CSV export. Full reference: docs/law.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from fractions import Fraction
from typing import Optional, Sequence

from .agreement import law_agreement
from .entropy_change import entropy_change_correlation, same_step_correlation
from .heldout import (DEFAULT_BOOTSTRAP, DEFAULT_FIT_FRACTION, MIN_BOOTSTRAP, RunLaw, check_bootstrap,
                      check_split_options, fit_run)
from .keys import ENTROPY_KEYS, OBSERVED_CHANGE_KEYS, PERFORMANCE_KEYS, PREDICTION_KEYS, STEP_COLUMNS, resolve_key
from .plot import default_plot_path, plot_laws
from .readers import SOURCES, read_run
from .series import LawInputError, pair_series

_PREDICTION_HINT = ("; the local engine logs it as entropy_change_predicted (Theorem 1 for the step's sampled tokens; "
                    "the NeMo-RL path has no per-token Cov_pi(log pi, pi) of the old policy to compute it): name "
                    "another key with --prediction-key")


def _fraction(text: str) -> Fraction:
    try:
        return Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction such as 1/3") from None


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=("auto",) + SOURCES, default="auto",
                        help="how to read every RUN (default auto: *.csv -> csv, *.jsonl or a directory with "
                             "metrics.jsonl -> jsonl, a directory with TensorBoard event files in or below it "
                             "-> tensorboard)")
    parser.add_argument("--step-key", default=None, metavar="NAME",
                        help=f"step column of a CSV (default: the first of {', '.join(STEP_COLUMNS)}) or step "
                             "field of JSON lines (default: step); TensorBoard has its own steps")
    parser.add_argument("--entropy-key", default=None, metavar="KEY",
                        help=f"the entropy scalar (default: the first present of {', '.join(ENTROPY_KEYS)}); "
                             "in a W&B chart export, 'KEY' also matches the column '<run> - KEY'")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of the table (schema: docs/law.md)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-entropy law", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="{fit,diagnose}")
    commands.required = True

    fit = commands.add_parser(
        "fit", help="fit R = -a exp(H) + b to runs; predict the held-out steps; compare several runs",
        description="Fit the entropy-performance law R = -a exp(H) + b on the first part of each run (closed-form "
                    "least squares, percentile-bootstrap 95% intervals), predict the rest of the run from its "
                    "entropy (rmse_heldout), and with several runs say whether their a and b agree.")
    fit.add_argument("runs", nargs="+", metavar="RUN",
                     help="run directory or metrics.jsonl, TensorBoard directory or event file, or CSV file")
    _add_source_args(fit)
    fit.add_argument("--performance-key", default=None, metavar="KEY",
                     help=f"the performance scalar (default: the first present of {', '.join(PERFORMANCE_KEYS)})")
    split = fit.add_mutually_exclusive_group()
    split.add_argument("--fit-steps", type=int, default=None, metavar="N",
                       help="fit on the points logged at step <= N (integer >= 1)")
    split.add_argument("--fit-fraction", type=_fraction, default=None, metavar="F",
                       help=f"fit on the first floor(F n) of the n points, 0 < F <= 1, e.g. 0.5 or 1/3 "
                            f"(default {DEFAULT_FIT_FRACTION}; 1 = the whole run, nothing held out)")
    fit.add_argument("--heldout-fraction", type=_fraction, default=None, metavar="G",
                     help="predict only the last floor(G n) points, 0 < G < 1 (default: every point after the "
                          "fit part); must not overlap the fit part")
    fit.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, metavar="N",
                     help=f"bootstrap resamples for the 95%% intervals (default {DEFAULT_BOOTSTRAP}; 0 = no "
                          f"intervals; otherwise >= {MIN_BOOTSTRAP}; several runs need intervals)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    plot = fit.add_mutually_exclusive_group()
    plot.add_argument("--plot", default=None, metavar="PATH",
                      help="where to write the plot of R against H (default: law_fit.png in the first RUN's "
                           "directory, or <name>_law_fit.png next to a RUN file)")
    plot.add_argument("--no-plot", action="store_true", help="write no plot")
    fit.set_defaults(handler=_fit_command)

    diagnose = commands.add_parser(
        "diagnose", help="correlation of the observed entropy change H(t+1) - H(t) with its predicted value",
        description="Pair the predicted entropy change logged at step t (Theorem 1) with the observed change "
                    "(measured on the same tokens at the same step when the run logs it, else H(t+1) - H(t)) and "
                    "print their Pearson correlation over the run, the number of pairs, the slope of observed on "
                    "predicted, and the keys used.")
    diagnose.add_argument("run", metavar="RUN",
                          help="run directory or metrics.jsonl, TensorBoard directory or event file, or CSV file")
    _add_source_args(diagnose)
    diagnose.add_argument("--prediction-key", default=None, metavar="KEY",
                          help=f"the predicted entropy change per step (default: the first present of "
                               f"{', '.join(PREDICTION_KEYS)})")
    diagnose.add_argument("--observed-key", default=None, metavar="KEY",
                          help=f"an entropy change measured at step t on the prediction's own tokens, paired at the same "
                               f"step (default: the first present of {', '.join(OBSERVED_CHANGE_KEYS)}, logged by "
                               f"engine.entropy_change_check; else H(t+1) - H(t) of the entropy key)")
    diagnose.set_defaults(handler=_diagnose_command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "fit":  # flag values are checked before any run is read
        try:
            check_bootstrap(args.bootstrap)
            check_split_options(fit_steps=args.fit_steps, fit_fraction=args.fit_fraction,
                                heldout_fraction=args.heldout_fraction)
        except LawInputError as exc:
            parser.error(str(exc))
        if len(args.runs) > 1 and args.bootstrap == 0:
            parser.error("--bootstrap 0 leaves no intervals, and comparing several runs compares their intervals: "
                         f"use --bootstrap >= {MIN_BOOTSTRAP}")
    try:
        return args.handler(args)
    except LawInputError as exc:
        print(f"nemo-entropy law {args.command}: error: {exc}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------------------ fit

def _fit_one(path: str, args) -> RunLaw:
    scalars = read_run(path, source=args.source, step_key=args.step_key)
    entropy_key = resolve_key(scalars, args.entropy_key, ENTROPY_KEYS, role="entropy", flag="--entropy-key")
    performance_key = resolve_key(scalars, args.performance_key, PERFORMANCE_KEYS, role="performance",
                                  flag="--performance-key")
    series = pair_series(scalars, entropy_key, performance_key)
    return fit_run(series, fit_steps=args.fit_steps, fit_fraction=args.fit_fraction,
                   heldout_fraction=args.heldout_fraction, bootstrap=args.bootstrap, seed=args.seed)


def _fit_command(args) -> int:
    laws = [_fit_one(path, args) for path in args.runs]
    agreement = law_agreement(laws) if len(laws) > 1 else None
    plot_path = None
    if not args.no_plot:
        plot_path = plot_laws(laws, args.plot or default_plot_path(args.runs[0]), labels=args.runs)
    if args.json:
        for law in laws:  # stdout holds only the JSON; what was dropped still reaches the user
            print(f"{law.series.path}: {law.series.dropped_summary()}", file=sys.stderr)
            for note in law.series.notes:
                print(f"{law.series.path}: note: {note}", file=sys.stderr)
        if len(laws) == 1:
            out = {**laws[0].to_json(), "plot": plot_path}
        else:
            out = {"runs": [law.to_json() for law in laws], "agreement": agreement.to_json(), "plot": plot_path}
        print(json.dumps(out, indent=2))
    else:
        print(_fit_table(laws, args.runs, agreement, plot_path))
    return 0


def _num(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def _with_interval(value: float, interval) -> str:
    return _num(value) if interval is None else f"{_num(value)} [{_num(interval[0])}, {_num(interval[1])}]"


def _fit_table(laws: Sequence[RunLaw], labels: Sequence[str], agreement, plot_path: Optional[str]) -> str:
    header = ("run", "fit + held out", "a [95% CI]", "b [95% CI]", "ceiling b - a [95% CI]", "RMSE fit",
              "RMSE held out")
    rows = [header]
    for label, law in zip(labels, laws):
        iv = law.intervals
        rows.append((label, f"{law.n_fit} + {law.n_heldout}", _with_interval(law.fit.a, iv and iv.a),
                     _with_interval(law.fit.b, iv and iv.b), _with_interval(law.fit.ceiling, iv and iv.ceiling),
                     _num(law.fit.rmse), _num(law.rmse_heldout)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for label, law in zip(labels, laws):
        s = law.series
        lines.append(f"{label}: {s.source}, entropy {s.x_key!r}, performance {s.y_key!r}; {s.dropped_summary()}; "
                     f"fit on {law.split.rule}")
        lines += [f"{label}: note: {note}" for note in s.notes]
        if law.intervals is not None and law.intervals.degenerate:
            lines.append(f"{label}: {law.intervals.degenerate} of {law.intervals.resamples} bootstrap resamples "
                         f"held a single entropy value and were skipped")
    if agreement is not None:
        verdict = "AGREE" if agreement.agree else "DO NOT AGREE"
        lines.append(f"the runs {verdict} on the law: a {'agrees' if agreement.a.agree else 'differs'}, "
                     f"b {'agrees' if agreement.b.agree else 'differs'} (rule: {agreement.to_json()['rule']})")
        for coefficient in (agreement.a, agreement.b):
            if not coefficient.agree:
                lo, hi = labels[coefficient.lowest_high_run], labels[coefficient.highest_low_run]
                lines.append(f"  {coefficient.name}: the intervals of {lo} and {hi} do not overlap")
    if plot_path:
        lines.append(f"plot: {plot_path}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- diagnose

def _diagnose_command(args) -> int:
    scalars = read_run(args.run, source=args.source, step_key=args.step_key)
    entropy_key = resolve_key(scalars, args.entropy_key, ENTROPY_KEYS, role="entropy", flag="--entropy-key")
    prediction_key = resolve_key(scalars, args.prediction_key, PREDICTION_KEYS, role="predicted entropy change",
                                 flag="--prediction-key", hint=_PREDICTION_HINT)
    observed_key = None
    if args.observed_key is not None or any(k in scalars.keys() for k in OBSERVED_CHANGE_KEYS):
        observed_key = resolve_key(scalars, args.observed_key, OBSERVED_CHANGE_KEYS, role="observed entropy change",
                                   flag="--observed-key")
    steps, entropy = scalars.column(observed_key or entropy_key)
    _, predicted = scalars.column(prediction_key)
    try:
        if observed_key:
            result = same_step_correlation(steps, entropy, predicted)
        else:
            result = entropy_change_correlation(steps, entropy, predicted)
    except LawInputError as exc:
        raise LawInputError(f"{scalars.path}: {exc} [entropy {observed_key or entropy_key!r}, prediction "
                            f"{prediction_key!r}]") from None
    out = {"correlation": result.correlation, "n": result.n, "entropy_key": entropy_key, "observed_key": observed_key,
           "prediction_key": prediction_key, "slope": result.slope, "n_unpaired": result.n_unpaired,
           "run": scalars.path, "source": scalars.source}
    if args.json:
        for note in scalars.notes:
            print(f"{scalars.path}: note: {note}", file=sys.stderr)
        print(json.dumps(out, indent=2))
        return 0
    if observed_key:
        print(f"{args.run} ({scalars.source}): observed change {observed_key!r} (same tokens, same step) against "
              f"{prediction_key!r}")
    else:
        print(f"{args.run} ({scalars.source}): observed H(t+1) - H(t) of {entropy_key!r} against {prediction_key!r} "
              f"logged at t")
    print(f"  correlation {result.correlation:.4f} over n = {result.n} pairs "
          f"(slope of observed on predicted {result.slope:.4g}; {result.n_unpaired} steps without a next step)")
    for note in scalars.notes:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
