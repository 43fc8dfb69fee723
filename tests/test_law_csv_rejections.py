"""Issue 17, case 9: ``law fit`` on a CSV says which rows or cells it rejected and why, instead of "not present"."""

from __future__ import annotations

import math

import pytest

from nemo_entropy.law import ENTROPY_KEYS, LawInputError, read_run
from nemo_entropy.law.cli import main
from nemo_entropy.law.keys import resolve_key


def _rows(n=30, a=0.5, b=0.9):
    """Steps 1..n of an exact law R = -a exp(H) + b."""
    out = []
    for step in range(1, n + 1):
        h = 1.0 - step / (n + 5)
        out.append([str(step), repr(h), repr(-a * math.exp(h) + b)])
    return out


def _write(path, rows, header=("step", "entropy_mean", "val_accuracy")):
    path.write_text("\n".join(",".join(r) for r in [list(header), *rows]) + "\n")
    return path


def test_one_non_numeric_cell_is_rejected_alone_and_named(tmp_path, capsys):
    rows = _rows()
    rows[14][1] = "n/a"  # line 16 of the file (the header is line 1)
    path = _write(tmp_path / "run.csv", rows)
    scalars = read_run(str(path))
    assert "entropy_mean" in scalars.values and len(scalars.values["entropy_mean"]) == 29
    assert any("column 'entropy_mean': 1 non-numeric cell(s) rejected" in n and "line 16: 'n/a'" in n
               for n in scalars.notes)
    assert main(["fit", str(path), "--no-plot"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "line 16: 'n/a'" in text and "29" in text


def test_a_header_only_file_says_it_has_no_rows(tmp_path):
    path = _write(tmp_path / "empty.csv", [])
    with pytest.raises(LawInputError, match=r"empty\.csv: the CSV has a header \('step', 'entropy_mean', "
                                            r"'val_accuracy'\) but no data rows"):
        read_run(str(path))


def test_an_all_nan_entropy_column_says_why_it_was_rejected(tmp_path, capsys):
    rows = [[r[0], "nan" if i % 2 else "", r[2]] for i, r in enumerate(_rows())]
    path = _write(tmp_path / "nan.csv", rows)
    with pytest.raises(LawInputError, match=r"the entropy column 'entropy_mean' \(every one of its 30 cells is "
                                            r"empty or NaN\) was rejected; choose another with --entropy-key"):
        resolve_key(read_run(str(path)), None, ENTROPY_KEYS, role="entropy", flag="--entropy-key")
    assert main(["fit", str(path), "--no-plot"]) == 2
    assert "every one of its 30 cells is empty or NaN" in capsys.readouterr().err


def test_a_text_column_among_the_defaults_says_why_it_was_rejected(tmp_path):
    rows = [[r[0], "high" if i < 29 else "", r[2]] for i, r in enumerate(_rows())]
    path = _write(tmp_path / "text.csv", rows)
    with pytest.raises(LawInputError, match=r"the entropy column 'entropy_mean' \(non-numeric value 'high' at "
                                            r"line 2\) was rejected"):
        resolve_key(read_run(str(path)), None, ENTROPY_KEYS, role="entropy", flag="--entropy-key")
