"""FFA-LoRA: A frozen and identical everywhere, only B sent, FedAvg of B exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from test_fedavg import reply

from fedhaven import protocol
from fedhaven.config import Config
from fedhaven.models import LORA_A, adapter_state, build_model, set_adapter_state
from fedhaven.server.app import build_strategy
from fedhaven.training import train_round

pytestmark = pytest.mark.usefixtures("flower_identity")


def _ffa(cfg: Config) -> Config:
    return cfg.replace(**{"federation.strategy": "ffa"})


def _lora_a(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if LORA_A in n}


def test_a_is_frozen_identical_and_never_sent(tiny_cfg: Config) -> None:
    cfg = _ffa(tiny_cfg)
    one, two = build_model(cfg), build_model(cfg)
    a1, a2 = _lora_a(one), _lora_a(two)
    assert a1 and all(torch.equal(a1[n], a2[n]) for n in a1)  # every site builds the same A
    assert all(a1[n].abs().sum() > 0 for n in a1)  # a random init, not zeros
    sent = adapter_state(one)
    assert not any(LORA_A in n for n in sent)
    assert any(".lora_B." in n for n in sent)
    # half the LoRA tensors: the bytes of A are not sent
    full = adapter_state(build_model(tiny_cfg))
    a_bytes = sum(t.numel() * t.element_size() for n, t in full.items() if LORA_A in n)
    nbytes = sum(t.numel() * t.element_size() for t in sent.values())
    assert nbytes == sum(t.numel() * t.element_size() for t in full.values()) - a_bytes


@pytest.mark.parametrize("privacy", [False, True])
def test_training_moves_b_and_leaves_a_bit_identical(tiny_cfg: Config, privacy: bool) -> None:
    from fedhaven.client.app import site_data

    cfg = _ffa(tiny_cfg).replace(**{"privacy.enabled": privacy})
    a_init = _lora_a(build_model(cfg))
    state = sent_before = adapter_state(build_model(cfg))
    train, _ = site_data(cfg, {"partition-id": 0, "num-partitions": 2})
    for server_round in (1, 2):  # a fresh model each round, from the last global state
        model = build_model(cfg)
        set_adapter_state(model, state)
        train_round(model, train, cfg, server_round=server_round)
        assert all(torch.equal(p, a_init[n]) for n, p in _lora_a(model).items())
        state = adapter_state(model)
    assert any(not torch.equal(state[n], sent_before[n]) for n in state if ".lora_B." in n)


def test_fedavg_of_b_is_the_exact_mean_of_the_products(tiny_cfg: Config) -> None:
    cfg = _ffa(tiny_cfg)
    strategy = build_strategy(cfg)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 32)).astype(np.float32)  # the shared, frozen A (r=4, d=32)
    bs = [rng.normal(size=(32, 4)).astype(np.float32) for _ in range(3)]
    counts = [10, 30, 60]
    replies = [
        reply(i + 1, {"lora_B": torch.from_numpy(b)}, num_examples=n)
        for i, (b, n) in enumerate(zip(bs, counts, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    b_mean = protocol.from_record(arrays)["lora_B"].numpy()
    exact = sum(n * (b @ a) for b, n in zip(bs, counts, strict=True)) / sum(counts)
    np.testing.assert_allclose(b_mean @ a, exact, rtol=1e-5, atol=1e-5)
    # the same with every site's own A (plain FedAvg of A and B) is not exact
    a_k = [rng.normal(size=(4, 32)).astype(np.float32) for _ in range(3)]
    a_mean = sum(n * x for x, n in zip(a_k, counts, strict=True)) / sum(counts)
    exact_k = sum(n * (b @ x) for b, x, n in zip(bs, a_k, counts, strict=True)) / sum(counts)
    assert np.abs(b_mean @ a_mean - exact_k).max() > 0.1
    assert isinstance(arrays, ArrayRecord)
