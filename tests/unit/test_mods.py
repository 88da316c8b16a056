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
from fedhaven.client.mods import allowlist_mod, central_clipping_mod

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


def _clipping_run(config: dict[str, object]) -> Message:
    msg = _instruction(MessageType.TRAIN)
    msg.content[protocol.CONFIG] = ConfigRecord({protocol.SERVER_ROUND: 1, **config})
    # the site moved lora_B by 3 and the head by 4 from what it received: update norm 5
    moved = {"lora_B": ADAPTER["lora_B"] + 3 / np.sqrt(8), "classifier": ADAPTER["classifier"]}
    moved["classifier"] = moved["classifier"] + 4 / np.sqrt(3)
    reply = Message(_train_content(moved, {protocol.NUM_EXAMPLES: 5}), reply_to=msg)
    return central_clipping_mod(msg, _context(), lambda m, c: reply)


def _update_norm(out: Message) -> float:
    sent = {k: out.content[protocol.ARRAYS][k].numpy() - v for k, v in ADAPTER.items()}
    return float(np.sqrt(sum((d**2).sum() for d in sent.values())))


def test_central_clipping_mod_is_a_no_op_unless_the_round_asks_for_clipping() -> None:
    out = _clipping_run({})
    assert _update_norm(out) == pytest.approx(5.0, rel=1e-5)
    assert protocol.NORM_BIT not in out.content[protocol.METRICS]


@pytest.mark.parametrize("adaptive", [False, True])
def test_central_clipping_mod_clips_the_update_to_the_bound(adaptive: bool) -> None:
    config = {protocol.CLIPPING_NORM: 1.0, protocol.ADAPTIVE_CLIPPING: adaptive}
    out = _clipping_run(config)
    assert _update_norm(out) == pytest.approx(1.0, rel=1e-5)
    metrics = out.content[protocol.METRICS]
    assert (protocol.NORM_BIT in metrics) is adaptive
    if adaptive:
        assert metrics[protocol.NORM_BIT] == 1  # the update was above the bound
    # what the mod adds is still inside the allow-list
    protocol.check_reply(
        out.content,
        train=True,
        expected=protocol.shapes(ArrayRecord({k: Array(v) for k, v in ADAPTER.items()})),
    )
