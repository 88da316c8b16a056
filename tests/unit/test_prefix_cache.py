"""The frozen-prefix cache of seq-cls: ``encode`` runs the embeddings and the layers below
the lowest adapted one once per row, and the model runs only the rest — same logits, same
training, at a fraction of the cost. On the tiny BERT (2 layers, LoRA on the last: k = 1)."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from torch.utils.data import TensorDataset

from fedhaven import data as fdata
from fedhaven.config import Config
from fedhaven.models import adapter_state, build_model
from fedhaven.tasks import get_task, seq_cls
from fedhaven.training import evaluate, train_round

HIDDEN, LENGTH = 32, 16  # the tiny BERT's hidden size, tiny_cfg's model.max-length


@pytest.fixture(scope="module")
def cfg(tiny_cfg: Config) -> Config:
    return tiny_cfg.replace(**{"lora.layers": "-1"})


@pytest.fixture(scope="module")
def rows() -> Dataset:
    """30 rows of 1 to 13 words, so that rows and evaluation batches differ in length;
    "good" and [MASK] vary the content."""
    rng = random.Random(0)
    texts = [
        " ".join(rng.choice(["good", "[MASK]"]) for _ in range(rng.randint(1, 13)))
        for _ in range(30)
    ]
    return Dataset.from_dict({fdata.TEXT: texts, fdata.LABEL: [i % 3 for i in range(30)]})


@pytest.fixture(scope="module")
def cached(cfg: Config, rows: Dataset) -> TensorDataset:
    return get_task(cfg).encode(rows)


@pytest.fixture(scope="module")
def uncached(cfg: Config, rows: Dataset) -> TensorDataset:
    """The same rows as token ids (the cache switched off by its memory guard)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seq_cls, "PREFIX_CACHE_MAX_BYTES", 0)
        return get_task(cfg).encode(rows)


def test_encode_caches_the_prefix_only_when_a_layer_is_frozen(
    cfg: Config, rows: Dataset, cached: TensorDataset
) -> None:
    states, mask, labels = cached.tensors
    assert get_task(cfg).frozen_layers() == 1
    assert states.dtype == torch.float32
    assert states.shape == (len(labels), LENGTH, HIDDEN)
    assert get_task(cfg).input_names(cached) == ("hidden_states", "attention_mask")
    every = cfg.replace(**{"lora.layers": ""})  # LoRA on every layer: nothing to cache
    ids, mask_every, _ = get_task(every).encode(rows).tensors
    assert ids.dtype == torch.long and ids.shape == mask.shape == (len(labels), LENGTH)
    assert torch.equal(mask, mask_every)


@pytest.mark.parametrize(
    ("settings", "k"),
    [
        ({}, 1),
        ({"lora.layers": "1"}, 1),
        ({"lora.layers": "0,1"}, 0),
        ({"model.pooling": "cls"}, 0),  # a transformers head: PEFT's SEQ_CLS wrapper
        ({"lora.modules-to-save": "classifier,pooler"}, 1),  # the pooler is past the prefix
        ({"lora.modules-to-save": "classifier,LayerNorm"}, 0),  # trains the prefix's too
        ({"lora.modules-to-save": "classifier,embeddings"}, 0),
        ({"lora.modules-to-save": "classifier,encoder"}, 0),
    ],
)
def test_frozen_layers(cfg: Config, settings: dict[str, str], k: int) -> None:
    assert get_task(cfg.replace(**settings)).frozen_layers() == k


def test_cached_logits_equal_the_full_forward(
    cfg: Config, cached: TensorDataset, uncached: TensorDataset
) -> None:
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at 0: make the adapter count
                p.copy_(torch.randn_like(p))
        states, mask, _ = cached.tensors
        ids, _, _ = uncached.tensors
        full = model(input_ids=ids, attention_mask=mask).logits
        fast = model(hidden_states=states, attention_mask=mask).logits
    assert torch.allclose(full, fast, atol=1e-5)
    assert not torch.allclose(full[0], full[1], atol=1e-3)  # a real comparison, not all equal
    # evaluation cuts each batch after its longest row, in the states' dimension 1 too
    slow_eval, fast_eval = evaluate(model, uncached, cfg), evaluate(model, cached, cfg)
    assert fast_eval["loss"] == pytest.approx(slow_eval["loss"], abs=1e-5)
    assert fast_eval["confusion"] == slow_eval["confusion"]


def test_dp_round_on_the_cache_trains_the_adapter_and_head(
    cfg: Config, rows: Dataset, cached: TensorDataset
) -> None:
    private = cfg.replace(**{"train.local-steps": 2, "privacy.enabled": True})
    model = build_model(private)
    before = adapter_state(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train_round(model, cached, private)  # the opacus#820 guard runs inside
    after = adapter_state(model)
    assert result.steps == 2 and result.epsilon is not None and result.epsilon > 0
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert {n for n in before if "lora_B" in n} <= moved
    assert {n for n in before if "classifier" in n} <= moved
    # nothing below the adapted layer trains, nor does the source of the cached states
    assert all(".layer.1." in n or "classifier" in n for n in before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert torch.equal(get_task(cfg).encode(rows).tensors[0], cached.tensors[0])


def test_training_on_the_cache_equals_training_on_token_ids(
    cfg: Config, cached: TensorDataset, uncached: TensorDataset
) -> None:
    plain = cfg.replace(**{"train.local-steps": 3, "privacy.enabled": False})
    fast, slow = build_model(plain), build_model(plain)
    fast_result = train_round(fast, cached, plain)  # same seed: the same batches
    slow_result = train_round(slow, uncached, plain)
    assert fast_result.loss == pytest.approx(slow_result.loss, abs=1e-5)
    fast_state, slow_state = adapter_state(fast), adapter_state(slow)
    assert all(torch.allclose(fast_state[n], slow_state[n], atol=1e-5) for n in fast_state)


def test_memory_guard_keeps_token_ids(
    cfg: Config, uncached: TensorDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, mask, _ = uncached.tensors
    assert ids.dtype == torch.long and ids.shape == mask.shape
    task = get_task(cfg)
    assert task.input_names(uncached) == ("input_ids", "attention_mask")
    # the model (built for k = 1) still takes the whole encoder's path, in training too
    private = cfg.replace(**{"train.local-steps": 1, "privacy.enabled": True})
    assert train_round(build_model(private), uncached, private).steps == 1
