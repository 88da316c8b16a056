"""The outgoing allow-list as a Flower client mod, tested with a stub `call_next`."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from fedhaven import protocol
from fedhaven.client.mods import allowlist_mod

pytestmark = pytest.mark.usefixtures("flower_identity")

ADAPTER = {"lora_B": np.zeros((4, 2), dtype=np.float32), "classifier": np.ones(3, np.float32)}


def _instruction(kind: str) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(v) for k, v in ADAPTER.items()}),
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1}),
        }
    )
    return Message(content, dst_node_id=1, message_type=kind)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _run(kind: str, content: RecordDict) -> tuple[Message, Message]:
    msg = _instruction(kind)
    reply = Message(content, reply_to=msg)
    return reply, allowlist_mod(msg, _context(), lambda m, c: reply)


def _train_content(arrays: dict[str, np.ndarray], metrics: dict[str, float]) -> RecordDict:
    return RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            protocol.METRICS: MetricRecord(metrics),
        }
    )


def test_a_normal_train_reply_passes_unchanged() -> None:
    reply, out = _run(MessageType.TRAIN, _train_content(ADAPTER, {protocol.NUM_EXAMPLES: 5}))
    assert out is reply and not out.has_error()


def test_a_normal_evaluate_reply_passes_unchanged() -> None:
    content = RecordDict({protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 5})})
    reply, out = _run(MessageType.EVALUATE, content)
    assert out is reply


@pytest.mark.parametrize(
    ("arrays", "metrics", "reason"),
    [
        ({**ADAPTER, "embeddings": np.zeros(8, np.float32)}, {}, "tensors differ"),
        (ADAPTER, {"raw-text-length": 3.0}, "metrics outside the allow-list"),
        ({**ADAPTER, "lora_B": np.zeros((4, 3), np.float32)}, {}, "has shape"),
    ],
)
def test_a_reply_with_anything_extra_becomes_an_error_reply(
    arrays: dict[str, np.ndarray], metrics: dict[str, float], reason: str
) -> None:
    content = _train_content(arrays, {protocol.NUM_EXAMPLES: 5, **metrics})
    _, out = _run(MessageType.TRAIN, content)
    assert out.has_error()
    assert out.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert reason in out.error.reason
