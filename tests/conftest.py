"""Shared fixtures: a tiny BERT built from a config (no hub), a tiny labeled CSV, a config."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from fedhaven.config import Config, from_flat

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "helped", "better", "relief", "works", "love", "excellent"]
NEGATIVE = ["bad", "worse", "pain", "awful", "nausea", "headache", "hate", "terrible"]
NEUTRAL = ["okay", "fine", "average", "some", "mixed", "unsure", "normal", "moderate"]
FILLER = ["the", "drug", "pill", "it", "was", "this", "my", "dose", "very", "and", "felt", "i"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL + FILLER
VOCAB = SPECIAL + WORDS
LABELS = ["negative", "neutral", "positive"]
_BY_LABEL = {"negative": NEGATIVE, "neutral": NEUTRAL, "positive": POSITIVE}


def _make_rows(n: int, seed: int) -> pd.DataFrame:
    """``n`` short reviews, labels cycling negative / neutral / positive."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = LABELS[i % 3]
        words = rng.sample(_BY_LABEL[label], 2) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "rating": label})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def make_rows() -> Callable[[int, int], pd.DataFrame]:
    """``make_rows(n, seed)``: a DataFrame of ``n`` short labeled reviews."""
    return _make_rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        # No dropout in the base: private and plain training must see the same forward pass.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForSequenceClassification(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


#: The tiny vision models' image side (the tiny ViT's input size).
TINY_IMAGE_SIZE = 16


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT built from a config, saved without an image processor (fedhaven's default
    one applies)."""
    from transformers import ViTConfig, ViTForImageClassification

    d = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(
        image_size=TINY_IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTForImageClassification(config).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.csv"
    _make_rows(60, seed=1).to_csv(p, index=False)
    return p


@pytest.fixture(scope="session")
def tiny_test_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "test.csv"
    _make_rows(24, seed=2).to_csv(p, index=False)
    return p


@pytest.fixture(scope="session")
def tiny_flat(tiny_model_dir: Path, tiny_csv: Path, tiny_test_csv: Path) -> dict[str, object]:
    return {
        "model.path": str(tiny_model_dir),
        "model.max-length": 16,
        "data.path": str(tiny_csv),
        "data.test-path": str(tiny_test_csv),
        "data.partition": "iid",
        "train.batch-size": 8,
        "train.eval-batch-size": 16,
        "federation.rounds": 2,
        "federation.sites": 2,
    }


@pytest.fixture(scope="session")
def tiny_cfg(tiny_flat: dict[str, object]) -> Config:
    return from_flat(tiny_flat)


@pytest.fixture
def flower_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a Flower process sets before it builds messages: its run, node and task ids.

    Flower 1.42 reads them when a Message is created; hand-built messages need them too.
    """
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
