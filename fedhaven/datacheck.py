"""A site's data, checked and prepared where it lives, since nobody else may see it.

The steps, in order, for a text classification table (csv / tsv / jsonl / parquet):

1. schema: the text and label columns exist and hold scalars (text: strings); the file is
   UTF-8 (:func:`fedhaven.data.read_table`);
2. empty text (after :func:`fedhaven.data.clean_text`): dropped;
3. labels: a missing label or one outside the run's set (``data.labels``), and one that
   differs from a run label only by case or whitespace (``Positive `` for ``positive``), are
   handled by the site's label rule (``drop``, ``map`` variants onto the run's label, or
   ``stop``: refuse with one line);
4. one text, several labels (after normalisation): every such row is dropped, since no label
   is known to be right and the copies would straddle the train / validation split;
5. exact duplicates (the same cleaned text and label) and near-exact ones (the same text
   after Unicode NFKC, case folding, punctuation and whitespace removal): the first is kept;
6. per-label counts against the site's minimum per class (a warning);
7. the site's stratified, seeded train / validation split (:func:`fedhaven.data.split_train_val`).

Every step is counted in a :class:`DataReport`. The report holds counts and the run's own
label names only, never a row's content: it goes into the site's audit log, its totals into
the run's model card, and ``fedhaven data check`` prints it. The same function serves
``data.prepare`` (every load), the ClientApp and the CLI, so they run the same steps.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from datasets import Dataset, Value

from fedhaven.config import LABEL_RULE, MIN_PER_CLASS, DataConfig
from fedhaven.data import (
    LABEL,
    TEXT,
    clean_text,
    require_columns,
    split_indices,
    split_train_val,
)
from fedhaven.errors import FedhavenError
from fedhaven.site_config import SiteConfig

log = logging.getLogger(__name__)

#: The site's label rules (node config ``label-rule``).
DROP, MAP, STOP = "drop", "map", "stop"
LABEL_RULES = (DROP, MAP, STOP)
#: Defaults: ``stop`` changes nothing silently; 5 rows is where per-class F1 on a site's
#: validation share (20%) has a single example left.
DEFAULT_LABEL_RULE, DEFAULT_MIN_PER_CLASS = STOP, 5

# Why a row was dropped (the report's keys, in step order).
EMPTY_TEXT = "empty_text"
MISSING_LABEL = "missing_label"
UNKNOWN_LABEL = "unknown_label"
LABEL_VARIANT = "label_variant"
CONFLICTING_LABELS = "conflicting_labels"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
REASONS = (
    EMPTY_TEXT,
    MISSING_LABEL,
    UNKNOWN_LABEL,
    LABEL_VARIANT,
    CONFLICTING_LABELS,
    EXACT_DUPLICATE,
    NEAR_DUPLICATE,
)
_STOP_WHAT = {
    MISSING_LABEL: "no label",
    UNKNOWN_LABEL: "a label not in the configured label set",
    LABEL_VARIANT: "a label that differs from one in the set only by case or whitespace",
}
_TEXT_TYPES = ("string", "large_string")
_PUNCTUATION = re.compile(r"[\W_]+")  # after NFKC: anything but letters and digits


@dataclass(frozen=True)
class DataRules:
    """The site's own rules for its data (node config; ``fedhaven site`` / ``data check``)."""

    label_rule: str = DEFAULT_LABEL_RULE
    min_per_class: int = DEFAULT_MIN_PER_CLASS

    def __post_init__(self) -> None:
        if self.label_rule not in LABEL_RULES:
            raise FedhavenError(
                f"site setting '{LABEL_RULE}' = {self.label_rule!r} is invalid: use "
                f"{', '.join(LABEL_RULES)}"
            )
        if isinstance(self.min_per_class, bool) or not isinstance(self.min_per_class, int):
            raise FedhavenError(
                f"site setting '{MIN_PER_CLASS}' = {self.min_per_class!r} is invalid: give a "
                "whole number >= 0 (0: no minimum)"
            )
        if self.min_per_class < 0:
            raise FedhavenError(
                f"site setting '{MIN_PER_CLASS}' = {self.min_per_class} is invalid: give a "
                "whole number >= 0 (0: no minimum)"
            )

    @classmethod
    def from_node(cls, node: Mapping[str, Any]) -> DataRules:
        """The rules in a node config (parsed as :class:`fedhaven.site_config.SiteConfig`)."""
        site = SiteConfig.from_node(node)
        return cls(
            DEFAULT_LABEL_RULE if site.label_rule is None else site.label_rule,
            DEFAULT_MIN_PER_CLASS if site.min_per_class is None else site.min_per_class,
        )


@dataclass
class DataReport:
    """What the checks did to a site's rows: counts and the run's label names, no content."""

    rows_in: int
    rows_kept: int
    #: rows dropped, by reason (every reason of :data:`REASONS`, zeros included)
    dropped: dict[str, int]
    #: label variants mapped onto the run's label (label rule ``map``); those rows are kept
    labels_mapped: int
    #: kept rows per run label, in ``data.labels`` order
    per_label: dict[str, int]
    label_rule: str
    min_per_class: int
    #: run labels with fewer kept rows than ``min_per_class`` (none at all included)
    below_minimum: list[str]
    #: after the split (``None`` before it): kept rows per label on each side
    train_per_label: dict[str, int] | None = None
    val_per_label: dict[str, int] | None = None
    #: validation rows that would have had a copy (exact or near) in training, had the
    #: duplicates been kept and split like the rest: what deduplication kept out of the
    #: site's validation scores (``None`` before the split)
    cross_split_duplicates: int | None = None

    @property
    def duplicates(self) -> int:
        return self.dropped[EXACT_DUPLICATE] + self.dropped[NEAR_DUPLICATE]

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_dropped": self.rows_dropped, "duplicates": self.duplicates}

    def warnings(self) -> list[str]:
        """One line per problem the site should know about (counts only)."""
        out = []
        if self.below_minimum:
            counts = ", ".join(f"{n} {self.per_label[n]}" for n in self.below_minimum)
            out.append(
                f"{len(self.below_minimum)} classes have fewer than {self.min_per_class} rows "
                f"({counts}): their validation scores mean little; add rows if the site has them"
            )
        if self.cross_split_duplicates:
            out.append(
                f"{self.cross_split_duplicates} validation rows would have had a copy in "
                "training: duplicates were removed before the split"
            )
        return out

    def rows(self) -> list[tuple[str, str]]:
        """(what, count) lines for a terminal table."""
        lines = [("rows in", str(self.rows_in))]
        lines += [(f"dropped: {r.replace('_', ' ')}", str(self.dropped[r])) for r in REASONS]
        lines += [
            (f"labels mapped (rule {self.label_rule})", str(self.labels_mapped)),
            ("rows kept", str(self.rows_kept)),
        ]
        for name, n in self.per_label.items():
            split = ""
            if self.train_per_label is not None and self.val_per_label is not None:
                split = f" (train {self.train_per_label[name]}, val {self.val_per_label[name]})"
            low = f"  below minimum {self.min_per_class}" if name in self.below_minimum else ""
            lines.append((f"label {name}", f"{n}{split}{low}"))
        if self.cross_split_duplicates is not None:
            crossing = str(self.cross_split_duplicates)
            lines.append(("duplicates that would cross the split", crossing))
        return lines


def normalise(text: str) -> str:
    """The key near-exact duplicates share: Unicode NFKC, case folded, punctuation and
    symbols removed, whitespace collapsed (``text`` already cleaned: entities decoded)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    key = " ".join(_PUNCTUATION.sub(" ", folded).split())
    return key or folded  # a text of punctuation only is its own key


def _label_text(value: Any) -> str | None:
    """A label cell as text (``None``: missing). Integral floats lose their ``.0``: a label
    column with a gap reads as floats (``1.0``) and must still match label ``1``."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    return text if text.strip() else None


def _canonical(label: str) -> str:
    return " ".join(label.split()).casefold()


def check_schema(ds: Dataset, cfg: DataConfig, source: str, labeled: bool) -> bool:
    """The text (and label) columns exist and hold what the task needs; returns whether a
    label column is there to encode."""
    needed = [(cfg.text_column, "text-column")]
    has_label = labeled or cfg.label_column in ds.column_names
    if has_label:
        needed.append((cfg.label_column, "label-column"))
    require_columns(ds, needed, source)
    text_type = ds.features[cfg.text_column]
    dtype = text_type.dtype if isinstance(text_type, Value) else type(text_type).__name__
    if dtype not in (*_TEXT_TYPES, "null"):  # null: every cell empty, the empty-text check's
        raise FedhavenError(
            f"{source}: column '{cfg.text_column}' holds {dtype} values, not text: set "
            "data.text-column (--text-column) to the column holding the text"
        )
    if has_label and not isinstance(ds.features[cfg.label_column], Value):
        kind = type(ds.features[cfg.label_column]).__name__
        raise FedhavenError(
            f"{source}: column '{cfg.label_column}' holds {kind} values, not one label per "
            "row: set data.label-column (--label-column) to the column holding the labels"
        )
    return has_label


def check(
    ds: Dataset,
    cfg: DataConfig,
    rules: DataRules | None = None,
    *,
    source: str = "data",
    labeled: bool = True,
    split_seed: int | None = None,
) -> tuple[Dataset, DataReport | None]:
    """Run the checks on ``ds``; returns the kept rows (columns ``text``, ``label`` (int, in
    ``cfg.label_names`` order) and the file's own) and the report.

    ``labeled=False`` (prediction) keeps one output per input row: no duplicate is dropped
    and no report made; a label column that is there is still encoded. ``split_seed``: also
    count the duplicates the site's split at that seed would have put on both sides.
    """
    rules = rules or DataRules()
    has_label = check_schema(ds, cfg, source, labeled)
    df = ds.to_pandas()
    rows_in = len(df)
    dropped = dict.fromkeys(REASONS, 0)
    text = df[cfg.text_column].map(lambda t: clean_text(t) if isinstance(t, str) else "")
    empty = text.str.len() == 0
    dropped[EMPTY_TEXT] = int(empty.sum())
    if dropped[EMPTY_TEXT]:
        log.warning("%s: dropped %d rows with empty text", source, dropped[EMPTY_TEXT])
    df = df.loc[~empty].assign(**{TEXT: text[~empty]})
    if df.empty:
        raise FedhavenError(f"{source}: every row has empty text in column '{cfg.text_column}'")
    if has_label:
        names = cfg.label_names
        ids, mapped = _resolve_labels(df[cfg.label_column], names, rules, dropped, source)
        df = df.assign(**{LABEL: ids}).loc[ids >= 0]
    if not labeled:
        return Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False), None

    keys = df[TEXT].map(normalise)
    crossing = None
    if split_seed is not None:
        crossing = _would_cross(keys.to_numpy(), df[LABEL].to_numpy(), cfg, split_seed)

    conflicting = df.groupby(keys)[LABEL].transform("nunique") > 1
    dropped[CONFLICTING_LABELS] = int(conflicting.sum())
    df, keys = df.loc[~conflicting], keys.loc[~conflicting]
    exact = df.duplicated(subset=[TEXT, LABEL])
    near = ~exact & keys.duplicated()
    dropped[EXACT_DUPLICATE], dropped[NEAR_DUPLICATE] = int(exact.sum()), int(near.sum())
    df = df.loc[~(exact | near)]
    if df.empty:
        raise FedhavenError(
            f"{source}: no row is left after the checks ({_dropped_text(dropped)}): fix the "
            "file's labels or set the site's label-rule"
        )

    counts = np.bincount(df[LABEL].to_numpy(), minlength=len(names))
    per_label = {n: int(c) for n, c in zip(names, counts, strict=True)}
    below = [n for n, c in per_label.items() if c < rules.min_per_class]
    report = DataReport(
        rows_in=rows_in,
        rows_kept=len(df),
        dropped=dropped,
        labels_mapped=mapped,
        per_label=per_label,
        label_rule=rules.label_rule,
        min_per_class=rules.min_per_class,
        below_minimum=below,
        cross_split_duplicates=crossing,
    )
    for line in report.warnings():
        log.warning("%s: %s", source, line)
    return Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False), report


def _resolve_labels(
    raw: pd.Series, names: list[str], rules: DataRules, dropped: dict[str, int], source: str
) -> tuple[np.ndarray, int]:
    """Each row's label id (-1: dropped) under the site's rule, and how many were mapped."""
    exact = {n: i for i, n in enumerate(names)}
    canonical: dict[str, int] = {}
    for i, n in enumerate(names):  # a form two run labels share maps to neither
        canonical[_canonical(n)] = -1 if _canonical(n) in canonical else i
    ids: list[int] = []
    kinds: list[str | None] = []
    for value in raw:
        text = _label_text(value)
        if text is None:
            label, kind = -1, MISSING_LABEL
        elif text in exact:
            label, kind = exact[text], None
        elif canonical.get(_canonical(text), -1) >= 0:
            label, kind = canonical[_canonical(text)], LABEL_VARIANT
        else:
            label, kind = -1, UNKNOWN_LABEL
        ids.append(label)
        kinds.append(kind)
    found = {k: kinds.count(k) for k in (MISSING_LABEL, UNKNOWN_LABEL, LABEL_VARIANT)}
    if rules.label_rule == STOP and any(found.values()):
        what = ", ".join(
            f"{n} row{'s' if n > 1 else ''} with {_STOP_WHAT[k]}" for k, n in found.items() if n
        )
        raise FedhavenError(
            f"{source}: {what} (the run's labels: {', '.join(names)}; label-rule = stop): fix "
            "those rows or data.labels, or "
            "set label-rule = map (variants onto the run's labels) or drop (the site's node "
            "config; `fedhaven data check --label-rule`)"
        )
    out = np.asarray(ids, dtype=np.int64)
    variant = np.asarray([k == LABEL_VARIANT for k in kinds], dtype=bool)
    if rules.label_rule == DROP:
        out[variant] = -1
    dropped[MISSING_LABEL], dropped[UNKNOWN_LABEL] = found[MISSING_LABEL], found[UNKNOWN_LABEL]
    dropped[LABEL_VARIANT] = found[LABEL_VARIANT] if rules.label_rule == DROP else 0
    return out, found[LABEL_VARIANT] if rules.label_rule == MAP else 0


def _dropped_text(dropped: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in dropped.items() if n) or "none"


@dataclass
class CheckedData:
    """A site's rows after the checks, split for training and validation, and the report."""

    train: Dataset
    val: Dataset
    report: DataReport


def check_site(
    ds: Dataset,
    cfg: DataConfig,
    rules: DataRules,
    *,
    seed: int,
    source: str = "data",
) -> CheckedData:
    """What a site trains and validates on: the checks, then the stratified split at
    ``cfg.val_fraction`` and ``seed``, counted per label on each side."""
    kept, report = check(ds, cfg, rules, source=source, split_seed=seed)
    assert report is not None  # labeled
    train, val = split_train_val(kept, cfg.val_fraction, seed)
    report.train_per_label = _per_label(train, cfg.label_names)
    report.val_per_label = _per_label(val, cfg.label_names)
    return CheckedData(train, val, report)


def _per_label(ds: Dataset, names: list[str]) -> dict[str, int]:
    counts = np.bincount(np.asarray(ds[LABEL], dtype=np.int64), minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts, strict=True)}


def _would_cross(keys: np.ndarray, labels: np.ndarray, cfg: DataConfig, seed: int) -> int:
    """Validation rows with a copy (the same normalised text) in training, had the rows of
    these ``keys`` been split as they are, duplicates and all."""
    in_val = np.zeros(len(keys), dtype=bool)
    in_val[split_indices(len(keys), labels, cfg.val_fraction, seed)] = True
    seen = set(keys[~in_val])
    return int(sum(k in seen for k in keys[in_val]))
