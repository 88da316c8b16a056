"""fedhaven.datacheck: each defect in a small file of its own, counted by hand; the stratified
split; `fedhaven data check`. The user's file is never modified."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datasets import Dataset

from fedhaven import data as fdata
from fedhaven.config import DataConfig
from fedhaven.datacheck import (
    CONFLICTING_LABELS,
    EMPTY_TEXT,
    EXACT_DUPLICATE,
    LABEL_VARIANT,
    MISSING_LABEL,
    NEAR_DUPLICATE,
    REASONS,
    UNKNOWN_LABEL,
    DataReport,
    DataRules,
    check_site,
)
from fedhaven.errors import FedhavenError

CFG = DataConfig(text_column="review", label_column="rating", val_fraction=0.2)
LABELS = CFG.label_names  # negative, neutral, positive
#: 5 distinct rows per label: no defect, no class under the default minimum (5)
CLEAN = [(f"{w} {label} review", label) for label in LABELS for w in "abcde"]


def _write(path: Path, rows: list[tuple[Any, Any]], encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(["review", "rating"])
        w.writerows(rows)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check(path: Path, rules: DataRules | None = None, cfg: DataConfig = CFG) -> DataReport:
    before = _sha(path)
    checked = check_site(fdata.read_table(str(path)), cfg, rules or DataRules(), seed=0)
    assert _sha(path) == before  # the user's file is never modified
    report = checked.report
    # the split covers exactly the kept rows, and the report counts each side
    assert len(checked.train) + len(checked.val) == report.rows_kept
    assert report.train_per_label is not None and report.val_per_label is not None
    for name, n in report.per_label.items():
        assert report.train_per_label[name] + report.val_per_label[name] == n
    return report


def _only(report: DataReport, **dropped: int) -> None:
    assert report.dropped == {r: dropped.get(r, 0) for r in REASONS}


# (extra rows added to CLEAN, rule, rows dropped by reason, labels mapped, kept per label)
CASES = {
    "exact-duplicate": ([CLEAN[0], CLEAN[0]], "stop", {EXACT_DUPLICATE: 2}, 0, (5, 5, 5)),
    # the same text after cleaning: HTML entities and surrounding quotes
    "exact-after-cleaning": (
        [('"a negative review"', "negative")],
        "stop",
        {EXACT_DUPLICATE: 1},
        0,
        (5, 5, 5),
    ),
    "near-duplicate": (
        [("  A   NEGATIVE review!! ", "negative"), ("b, neutral; review.", "neutral")],
        "stop",
        {NEAR_DUPLICATE: 2},
        0,
        (5, 5, 5),
    ),
    "empty-text": (
        [("", "positive"), ("   ", "negative"), ('""', "neutral")],
        "stop",
        {EMPTY_TEXT: 3},
        0,
        (5, 5, 5),
    ),
    # one text, two labels: both rows go, the clean one included
    "conflicting": (
        [("a negative review", "positive")],
        "stop",
        {CONFLICTING_LABELS: 2},
        0,
        (4, 5, 5),
    ),
    "variant-drop": (
        [("f positive review", "Positive "), ("f neutral review", " NEUTRAL")],
        "drop",
        {LABEL_VARIANT: 2},
        0,
        (5, 5, 5),
    ),
    "variant-map": (
        [("f positive review", "Positive "), ("f neutral review", " NEUTRAL")],
        "map",
        {},
        2,
        (5, 6, 6),
    ),
    "unknown-drop": ([("f review", "ecstatic")], "drop", {UNKNOWN_LABEL: 1}, 0, (5, 5, 5)),
    "unknown-map": (
        [("f review", "ecstatic"), ("g review", "Negative")],
        "map",
        {UNKNOWN_LABEL: 1},
        1,
        (6, 5, 5),
    ),
    "missing-label": ([("f review", "")], "drop", {MISSING_LABEL: 1}, 0, (5, 5, 5)),
}


@pytest.mark.parametrize("name", CASES)
def test_each_defect_is_counted(tmp_path: Path, name: str) -> None:
    extra, rule, dropped, mapped, kept = CASES[name]
    report = _check(_write(tmp_path / "site.csv", CLEAN + extra), DataRules(rule))
    assert report.rows_in == 15 + len(extra)
    _only(report, **dropped)
    assert report.labels_mapped == mapped
    assert report.rows_kept == sum(kept) == report.rows_in - sum(dropped.values())
    assert report.per_label == dict(zip(LABELS, kept, strict=True))
    assert report.below_minimum == [n for n, k in zip(LABELS, kept, strict=True) if k < 5]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ([("f review", "Positive ")], "1 row with a label that differs from one in the set only"),
        (
            [("f review", "ecstatic"), ("g review", "x")],
            "2 rows with a label not in the configured",
        ),
        ([("f review", "")], "1 row with no label"),
    ],
)
def test_stop_refuses_with_counts_only(
    tmp_path: Path, extra: list[tuple[str, str]], match: str
) -> None:
    path = _write(tmp_path / "site.csv", CLEAN + extra)
    before = _sha(path)
    with pytest.raises(FedhavenError, match=match) as e:
        check_site(fdata.read_table(str(path)), CFG, DataRules("stop"), seed=0)
    message = str(e.value)
    assert "\n" not in message
    assert "label-rule = stop" in message
    assert not any(v in message for v in ("Positive ", "ecstatic", "f review"))  # no content
    assert _sha(path) == before


def test_a_class_under_the_minimum_is_warned_about(tmp_path: Path) -> None:
    rows = [r for r in CLEAN if not (r[1] == "neutral" and r[0][0] in "de")]  # 3 neutral left
    report = _check(_write(tmp_path / "site.csv", rows), DataRules(min_per_class=4))
    assert report.per_label == {"negative": 5, "neutral": 3, "positive": 5}
    assert report.below_minimum == ["neutral"]
    assert report.warnings()[0].startswith("1 classes have fewer than 4 rows (neutral 3)")
    assert _check(_write(tmp_path / "b.csv", rows), DataRules(min_per_class=3)).below_minimum == []


def test_duplicates_that_would_cross_the_split(tmp_path: Path) -> None:
    # Kept, the two copies of "x" would split one each way: each label's 2 rows share
    # round(4 · 0.5) = 2 validation rows one each, whatever the seed. Removed, "x" trains
    # (a label with one row trains), and one of "y", "z" validates.
    cfg = DataConfig(text_column="review", label_column="rating", labels="a,b", val_fraction=0.5)
    path = _write(tmp_path / "site.csv", [("x", "a"), ("X!", "a"), ("y", "b"), ("z", "b")])
    report = _check(path, DataRules(min_per_class=0), cfg)
    _only(report, **{NEAR_DUPLICATE: 1})
    assert report.cross_split_duplicates == 1
    assert report.train_per_label == {"a": 1, "b": 1}
    assert report.val_per_label == {"a": 0, "b": 1}


def test_every_defect_at_once_and_the_json(tmp_path: Path) -> None:
    extra = [CLEAN[0], ("", "negative"), ("f review", "Positive "), ("g review", "nope")]
    extra += [("A NEGATIVE REVIEW", "negative"), ("b negative review", "positive")]
    report = _check(_write(tmp_path / "site.csv", CLEAN + extra), DataRules("map"))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["rows_in"] == 21
    # "a negative review" x3 (exact, near): 2 dropped; "b negative review" x2 labels: both
    assert d["dropped"] == {
        EMPTY_TEXT: 1,
        MISSING_LABEL: 0,
        UNKNOWN_LABEL: 1,
        LABEL_VARIANT: 0,
        CONFLICTING_LABELS: 2,
        EXACT_DUPLICATE: 1,
        NEAR_DUPLICATE: 1,
    }
    assert (d["rows_dropped"], d["duplicates"], d["labels_mapped"]) == (6, 2, 1)
    assert d["rows_kept"] == 15
    assert d["per_label"] == {"negative": 4, "neutral": 5, "positive": 6}
    assert d["below_minimum"] == ["negative"]
    # counts and the run's label names only: no text or label of a row anywhere
    assert not any(s in json.dumps(d) for s in ("review", "Positive ", "nope"))


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("missing-column", "column 'rating' not found"),
        ("latin-1", r"is not UTF-8: byte 0xe9 at byte 18 \(line 2\)"),
        ("numeric-text", "column 'review' holds int64 values, not text"),
    ],
)
def test_schema_and_encoding_errors(tmp_path: Path, kind: str, match: str) -> None:
    path = tmp_path / "site.csv"
    if kind == "missing-column":
        path.write_text("review,label\ngood,positive\n")
    elif kind == "latin-1":
        _write(path, [("café is good", "positive")], encoding="latin-1")  # é: byte 0xe9
    else:
        _write(path, [(1, "positive"), (2, "negative")])
    before = _sha(path)
    with pytest.raises(FedhavenError, match=match):
        check_site(fdata.read_table(str(path)), CFG, DataRules(), seed=0)
    assert _sha(path) == before


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"label-rule": "fix"}, "'label-rule' = 'fix' is invalid: use drop, map, stop"),
        ({"min-per-class": -1}, "'min-per-class' = -1 is invalid"),
        ({"min-per-class": "many"}, "'min-per-class' = 'many' is invalid"),
    ],
)
def test_bad_site_rules(node: dict[str, Any], match: str) -> None:
    with pytest.raises(FedhavenError, match=match):
        DataRules.from_node(node)


def test_site_rules_from_node_config() -> None:
    assert DataRules.from_node({}) == DataRules("stop", 5)
    assert DataRules.from_node({"label-rule": "map", "min-per-class": 2.0}) == DataRules("map", 2)


def _labeled(labels: list[int]) -> Dataset:
    return Dataset.from_dict({"text": [f"t{i}" for i in range(len(labels))], "label": labels})


def test_stratified_split_keeps_each_labels_share() -> None:
    # 10 / 7 / 3 rows, 20%: 4 validation rows; quotas 2.0, 1.4, 0.6 -> floors 2, 1, 0, and
    # the largest remainder (0.6) gives the last one to label 2.
    labels = [0] * 10 + [1] * 7 + [2] * 3
    train, val = fdata.split_train_val(_labeled(labels), 0.2, seed=3)
    assert np.bincount(list(val["label"]), minlength=3).tolist() == [2, 1, 1]
    assert np.bincount(list(train["label"]), minlength=3).tolist() == [8, 6, 2]
    assert sorted([*train["text"], *val["text"]]) == sorted(_labeled(labels)["text"])
    again = fdata.split_train_val(_labeled(labels), 0.2, seed=3)[1]
    assert list(again["text"]) == list(val["text"])  # seeded
    other = [fdata.split_train_val(_labeled(labels), 0.2, seed=s)[1]["text"] for s in range(5)]
    assert len({tuple(v) for v in other}) > 1


def test_a_class_with_one_row_trains() -> None:
    # 4 + 1 rows, 40%: 2 validation rows, both from label 0; label 1's only row trains.
    train, val = fdata.split_train_val(_labeled([0, 0, 0, 0, 1]), 0.4, seed=0)
    assert list(val["label"]) == [0, 0]
    assert sorted(train["label"]) == [0, 0, 1]


def test_cli_data_check(tmp_path: Path) -> None:
    path = _write(tmp_path / "site.csv", [*CLEAN, CLEAN[0], ("f review", "Positive ")])
    before = _sha(path)
    out = tmp_path / "report.json"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedhaven.cli", "data", "check", str(path)]
    stop = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert stop.returncode == 2
    lines = [ln for ln in stop.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stop.stderr
    assert "1 row with a label that differs" in lines[0]
    assert not out.exists()
    cmd += ["--label-rule", "map", "--min-per-class", "6", "--json", str(out)]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr
    d = json.loads(out.read_text())
    assert (d["rows_in"], d["rows_kept"], d["labels_mapped"]) == (17, 16, 1)
    assert d["dropped"][EXACT_DUPLICATE] == 1
    assert d["below_minimum"] == ["negative", "neutral"]
    assert d["train_per_label"] == {"negative": 4, "neutral": 4, "positive": 5}
    assert "warning: 2 classes have fewer than 6 rows" in ok.stdout
    assert _sha(path) == before


def test_prediction_rows_keep_their_duplicates(tmp_path: Path) -> None:
    # one output per input row: duplicates stay, only empty texts go
    path = _write(tmp_path / "in.csv", [("good", "positive"), ("good", "positive"), ("", "")])
    ds = fdata.load(str(path), CFG, labeled=False)
    assert list(ds["text"]) == ["good", "good"]
