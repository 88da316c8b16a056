"""fedhaven.strategies.FedAvg: weighted mean, rejection of bad replies, per-site bookkeeping."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedhaven import protocol
from fedhaven.strategies import FedAvg

pytestmark = pytest.mark.usefixtures("flower_identity")

W1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
W3 = torch.tensor([[5.0, 6.0], [7.0, 8.0]])


class FakeGrid:
    """Just enough of a Grid for configure_train: the connected node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


def instruction(node: int, kind: str = MessageType.TRAIN) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type=kind)


def reply(node: int, arrays: dict[str, torch.Tensor] | None, **metrics: float) -> Message:
    """A site's reply, with the metadata Flower gives it (src_node_id = the site)."""
    records: dict[str, object] = {
        protocol.METRICS: MetricRecord({k.replace("_", "-"): v for k, v in metrics.items()})
    }
    if arrays is not None:
        records[protocol.ARRAYS] = ArrayRecord(arrays)
    kind = MessageType.TRAIN if arrays is not None else MessageType.EVALUATE
    return Message(RecordDict(records), reply_to=instruction(node, kind))


def error_reply(node: int) -> Message:
    return Message(Error(code=0, reason="site crashed"), reply_to=instruction(node))


def _aggregate(strategy: FlowerFedAvg, replies: list[Message]) -> np.ndarray:
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    return protocol.from_record(arrays)["w"].numpy()


def test_weighted_mean_by_num_examples() -> None:
    strategy = FedAvg()
    replies = [
        reply(11, {"w": W1}, num_examples=1, train_loss=1.0),
        reply(22, {"w": W3}, num_examples=3, train_loss=3.0),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(protocol.from_record(arrays)["w"].numpy(), [[4, 5], [6, 7]])
    assert metrics is not None
    assert metrics[protocol.TRAIN_LOSS] == pytest.approx((1 * 1.0 + 3 * 3.0) / 4)
    assert strategy.round_stats[1]["sites_used"] == 2
    assert strategy.round_stats[1]["rejected"] == 0
    one = protocol.record_nbytes(ArrayRecord({"w": W1}))
    assert one >= 4 * 4  # four float32 values, plus serialisation overhead
    assert strategy.round_stats[1]["bytes_received"] == 2 * one


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(
            lambda: reply(33, {"w": W1}, num_examples=5, label_counts=9), id="extra-metric"
        ),
        pytest.param(lambda: error_reply(33), id="error-reply"),
        pytest.param(lambda: reply(33, {"w": W1}, train_loss=0.1), id="no-num-examples"),
        pytest.param(
            lambda: Message(
                RecordDict(
                    {
                        protocol.ARRAYS: ArrayRecord({"w": W1}),
                        protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 5}),
                        "leak": ConfigRecord({"patient": "x"}),
                    }
                ),
                reply_to=instruction(33),
            ),
            id="extra-record",
        ),
        pytest.param(
            lambda: reply(33, {"w": W1 * float("nan")}, num_examples=5), id="non-finite-tensor"
        ),
        pytest.param(lambda: reply(33, {"w": W1}, num_examples=0), id="zero-examples"),
        pytest.param(lambda: reply(33, {"w": W1}, num_examples=-5), id="negative-examples"),
        # allowed, but unlike the other sites' metrics: Flower's FedAvg would end the run
        pytest.param(
            lambda: reply(33, {"w": W1}, num_examples=5, train_loss=0.1), id="odd-metric-keys"
        ),
    ],
)
def test_bad_reply_is_rejected_and_the_round_goes_on(bad: object) -> None:
    strategy = FedAvg()
    good = [reply(11, {"w": W1}, num_examples=1), reply(22, {"w": W3}, num_examples=3)]
    replies = [*good[:1], bad(), *good[1:]]  # type: ignore[operator]
    np.testing.assert_allclose(_aggregate(strategy, replies), [[4, 5], [6, 7]])
    assert strategy.round_stats[1]["sites_used"] == 2
    assert strategy.round_stats[1]["rejected"] == 1
    assert set(strategy.site_metrics[1]) == {11, 22}


def test_flower_fedavg_would_end_the_run_on_the_same_replies() -> None:
    # Why the subclass exists: Flower's FedAvg raises on a reply with different metric keys.
    replies = [
        reply(11, {"w": W1}, num_examples=1),
        reply(33, {"w": W1}, num_examples=5, label_counts=9),
    ]
    flower = FlowerFedAvg(weighted_by_key=protocol.NUM_EXAMPLES, arrayrecord_key=protocol.ARRAYS)
    with pytest.raises(InconsistentMessageReplies):
        flower.aggregate_train(1, replies)
    np.testing.assert_allclose(_aggregate(FedAvg(), replies), W1.numpy())


def test_every_reply_rejected_gives_no_update() -> None:
    strategy = FedAvg()
    assert strategy.aggregate_train(1, [error_reply(1), error_reply(2)]) == (None, None)
    assert strategy.round_stats[1] == {
        "bytes_sent": 0,
        "bytes_received": 0,
        "sites_used": 0,
        "rejected": 2,
        "update_norm_median": None,
        "update_norm_max": None,
    }


def test_configure_train_fixes_the_expected_shapes() -> None:
    strategy = FedAvg(min_available_nodes=2, min_train_nodes=2)
    sent = ArrayRecord({"w": torch.zeros(2, 2)})
    messages = list(strategy.configure_train(1, sent, ConfigRecord(), FakeGrid([11, 22])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 22]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    by_node = {m.metadata.dst_node_id: m for m in messages}
    replies = [
        Message(protocol.train_reply({"w": W1}, {protocol.NUM_EXAMPLES: 2}), reply_to=by_node[11]),
        # wrong shape: dropped instead of crashing numpy's broadcasting
        Message(
            protocol.train_reply({"w": torch.ones(2, 3)}, {protocol.NUM_EXAMPLES: 2}),
            reply_to=by_node[22],
        ),
    ]
    np.testing.assert_allclose(_aggregate(strategy, replies), W1.numpy())
    stats = strategy.round_stats[1]
    assert (stats["sites_used"], stats["rejected"]) == (1, 1)
    assert stats["bytes_sent"] == 2 * protocol.record_nbytes(sent)


def test_site_metrics_keep_each_nodes_train_and_evaluate_metrics() -> None:
    strategy = FedAvg()
    strategy.aggregate_train(
        2,
        [
            reply(11, {"w": W1}, num_examples=1, epsilon=0.5, train_loss=1.0),
            reply(22, {"w": W3}, num_examples=3, epsilon=0.7, train_loss=2.0),
        ],
    )
    metrics = strategy.aggregate_evaluate(
        2,
        [
            reply(11, None, num_examples=4, accuracy=0.25),
            reply(22, None, num_examples=12, accuracy=0.75),
            reply(33, None, num_examples=0),  # a site without a validation split
        ],
    )
    assert metrics is not None
    assert metrics[protocol.ACCURACY] == pytest.approx((4 * 0.25 + 12 * 0.75) / 16)
    sites = strategy.site_metrics[2]
    assert sites[11]["train"] == {"num-examples": 1, "epsilon": 0.5, "train-loss": 1.0}
    assert sites[22]["train"][protocol.EPSILON] == 0.7
    assert sites[11]["evaluate"] == {"num-examples": 4, "accuracy": 0.25}
    assert sites[22]["evaluate"][protocol.ACCURACY] == 0.75
    assert 1 not in strategy.site_metrics


def test_evaluate_reply_with_arrays_is_rejected() -> None:
    strategy = FedAvg()
    leaky = Message(
        RecordDict(
            {
                protocol.ARRAYS: ArrayRecord({"w": W1}),
                protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 4, protocol.ACCURACY: 1.0}),
            }
        ),
        reply_to=instruction(11, MessageType.EVALUATE),
    )
    metrics = strategy.aggregate_evaluate(1, [leaky, reply(22, None, num_examples=2, accuracy=0.5)])
    assert metrics is not None and metrics[protocol.ACCURACY] == pytest.approx(0.5)
    assert set(strategy.site_metrics[1]) == {22}


def test_round_stats_report_update_norms_against_the_adapter_sent() -> None:
    strategy = FedAvg()
    sent = torch.zeros(2, 2)
    list(strategy.configure_train(1, ArrayRecord({"w": sent}), ConfigRecord(), FakeGrid([1, 2, 3])))
    # updates (reply − sent) of L2 norm 1, 2 and 10: [[1,0],[0,0]], [[0,0],[0,2]], [[6,8],[0,0]]
    replies = [
        reply(1, {"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}, num_examples=1),
        reply(2, {"w": torch.tensor([[0.0, 0.0], [0.0, 2.0]])}, num_examples=1),
        reply(3, {"w": torch.tensor([[6.0, 8.0], [0.0, 0.0]])}, num_examples=1),
    ]
    strategy.aggregate_train(1, replies)
    assert strategy.round_stats[1]["update_norm_median"] == pytest.approx(2.0)
    assert strategy.round_stats[1]["update_norm_max"] == pytest.approx(10.0)


class RejoiningGrid(FakeGrid):
    """Node ids that change as the round asks: ``steps[i]`` on the i-th call, then the last."""

    def __init__(self, steps: list[list[int]]) -> None:
        super().__init__(steps[0])
        self.steps, self.calls = steps, 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return list(self.steps[min(self.calls - 1, len(self.steps) - 1)])


def _nodes(messages: object) -> list[int]:
    return sorted(m.metadata.dst_node_id for m in messages)  # type: ignore[attr-defined]


@pytest.mark.parametrize("wait_s", [0.0, 5.0])
def test_a_round_waits_for_a_site_of_an_earlier_round_to_rejoin(wait_s: float) -> None:
    strategy = FedAvg(min_available_nodes=2, min_train_nodes=2)
    strategy.rejoin_wait_s = wait_s
    sent = ArrayRecord({"w": torch.zeros(2, 2)})
    assert _nodes(strategy.configure_train(1, sent, ConfigRecord(), FakeGrid([1, 2, 3]))) == [
        1,
        2,
        3,
    ]
    # site 3 was restarted: gone at first, back a moment later with the same node id
    grid = RejoiningGrid([[1, 2], [1, 2], [1, 2, 3]])
    t0 = time.monotonic()
    nodes = _nodes(strategy.configure_train(2, sent, ConfigRecord(), grid))
    assert nodes == ([1, 2, 3] if wait_s else [1, 2])
    assert time.monotonic() - t0 < 4  # it waited for site 3, not for the whole wait


def test_the_rejoin_wait_is_bounded() -> None:
    strategy = FedAvg(min_available_nodes=2, min_train_nodes=2)
    strategy.rejoin_wait_s = 0.3
    sent = ArrayRecord({"w": torch.zeros(2, 2)})
    list(strategy.configure_train(1, sent, ConfigRecord(), FakeGrid([1, 2, 3])))
    t0 = time.monotonic()
    nodes = _nodes(strategy.configure_train(2, sent, ConfigRecord(), FakeGrid([1, 2])))
    assert nodes == [1, 2]  # site 3 never came back: the round goes on without it
    assert 0.3 <= time.monotonic() - t0 < 2
