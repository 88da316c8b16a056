"""fedhaven.protocol: tensor <-> ArrayRecord, names, and the outgoing allow-list."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedhaven import protocol


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((3,), torch.float32),
        ((4, 5), torch.float32),
        ((2, 3, 4), torch.float32),
        ((1, 7), torch.float64),
        ((6,), torch.int64),
    ],
)
def test_record_round_trip_is_exact(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen, dtype=dtype)
    else:
        t = torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype)
    state = {"a.lora_A.weight": t, "b.weight": t * 2}
    back = protocol.from_record(protocol.to_record(state))
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype
        assert torch.equal(back[k], v)


def test_from_record_returns_independent_writable_tensors() -> None:
    record = protocol.to_record({"w": torch.zeros(3)})
    t = protocol.from_record(record)["w"]
    t += 1  # would fail on a read-only numpy buffer, or leak into the record
    assert torch.equal(protocol.from_record(record)["w"], torch.zeros(3))


def test_to_record_strips_opacus_prefix_and_counts_bytes() -> None:
    record = protocol.to_record({"_module.x.lora_B.weight": torch.ones(2, 3)})
    assert list(record.keys()) == ["x.lora_B.weight"]
    assert protocol.record_nbytes(record) >= 2 * 3 * 4


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("_module.base_model.model.classifier.weight", "base_model.model.classifier.weight"),
        ("_module._module.a.b", "a.b"),
        ("base_model.model.x._module.y", "base_model.model.x._module.y"),  # only a prefix
        ("plain", "plain"),
    ],
)
def test_canonical_name(name: str, canonical: str) -> None:
    assert protocol.canonical_name(name) == canonical


STATE = {"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(4, 2)}
EXPECTED = {k: tuple(v.shape) for k, v in STATE.items()}


def good_train() -> RecordDict:
    return protocol.train_reply(
        STATE, {protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 0.5, protocol.EPSILON: 1.0}
    )


def good_evaluate() -> RecordDict:
    return protocol.evaluate_reply({protocol.NUM_EXAMPLES: 5, protocol.ACCURACY: 0.4})


def test_check_reply_accepts_good_replies() -> None:
    protocol.check_reply(good_train(), train=True, expected=EXPECTED)
    protocol.check_reply(good_train(), train=True)
    protocol.check_reply(good_evaluate(), train=False)


def _with(content: RecordDict, **records: object) -> RecordDict:
    return RecordDict({**dict(content.items()), **records})


def _metrics(**m: float) -> MetricRecord:
    return MetricRecord({k.replace("_", "-"): v for k, v in m.items()})


@pytest.mark.parametrize(
    ("content", "train", "expected", "match"),
    [
        # an extra record of any kind
        (_with(good_train(), extra=ConfigRecord({"x": 1})), True, EXPECTED, "records outside"),
        (_with(good_train(), raw=ArrayRecord({"x": torch.zeros(1)})), True, EXPECTED, "records"),
        # a metric outside the allow-list
        (
            _with(good_train(), metrics=_metrics(num_examples=3, label_counts=7)),
            True,
            EXPECTED,
            "metrics outside",
        ),
        (
            _with(good_evaluate(), metrics=_metrics(num_examples=3, epsilon=1.0)),
            False,
            None,
            "metrics",
        ),
        # no example count, or no metrics at all
        (_with(good_train(), metrics=_metrics(train_loss=0.1)), True, EXPECTED, "num-examples"),
        (_with(good_evaluate(), metrics=_metrics(accuracy=0.1)), False, None, "num-examples"),
        (RecordDict({protocol.ARRAYS: protocol.to_record(STATE)}), True, EXPECTED, "MetricRecord"),
        # tensors in an evaluate reply
        (_with(good_evaluate(), arrays=protocol.to_record(STATE)), False, None, "records outside"),
        # a train reply without tensors
        (protocol.evaluate_reply({"num-examples": 1}), True, EXPECTED, "no ArrayRecord"),
        # keys or shapes other than the adapter's
        (
            protocol.train_reply({"a.lora_A.weight": torch.zeros(2, 4)}, {"num-examples": 1}),
            True,
            EXPECTED,
            "differ",
        ),
        (
            protocol.train_reply({**STATE, "base.embeddings": torch.zeros(3)}, {"num-examples": 1}),
            True,
            EXPECTED,
            "differ",
        ),
        (
            protocol.train_reply(
                {"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(2, 4)},
                {"num-examples": 1},
            ),
            True,
            EXPECTED,
            "shape",
        ),
    ],
)
def test_check_reply_rejects(
    content: RecordDict, train: bool, expected: object, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        protocol.check_reply(content, train=train, expected=expected)  # type: ignore[arg-type]


def test_allow_lists_are_disjoint_where_it_matters() -> None:
    # a site never reports ε from evaluation, nor validation accuracy from training
    assert protocol.EPSILON not in protocol.EVALUATE_METRICS
    assert protocol.ACCURACY not in protocol.TRAIN_METRICS
    assert protocol.NUM_EXAMPLES in protocol.TRAIN_METRICS & protocol.EVALUATE_METRICS


def test_train_config_carries_the_round() -> None:
    assert protocol.train_config(3)[protocol.SERVER_ROUND] == 3
