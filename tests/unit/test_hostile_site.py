"""The harness's hostile site (research on robust rules): its site setting and its client mod."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedhaven import protocol
from fedhaven.config import PARTITION_ID, UPDATE_SCALE, Config
from fedhaven.errors import FedhavenError
from fedhaven.simulations import site_settings, update_scale_mod

pytestmark = pytest.mark.usefixtures("flower_identity")

SENT = {"lora_B": np.array([[1.0, 2.0]], np.float32), "head": np.array([0.5], np.float32)}
TRAINED = {"lora_B": np.array([[1.5, 1.0]], np.float32), "head": np.array([0.25], np.float32)}


def _cfg(sites: int = 3) -> Config:
    return Config().replace(**{"federation.sites": sites, "federation.out-dir": "runs/r1"})


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _round(partition: int, scale_of: dict[int, float], kind: str = MessageType.TRAIN) -> Message:
    """One instruction through the mod, the site's reply being TRAINED."""
    content = RecordDict(
        {protocol.ARRAYS: _record(SENT), protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1})}
    )
    msg = Message(content, dst_node_id=1, message_type=kind)
    reply = RecordDict(
        {protocol.ARRAYS: _record(TRAINED), protocol.METRICS: MetricRecord({"num-examples": 4})}
    )
    ctxt = Context(
        run_id=1, node_id=1, node_config={PARTITION_ID: partition}, state=RecordDict(),
        run_config={},
    )  # fmt: skip
    sites = {i: {UPDATE_SCALE: s} for i, s in scale_of.items()}
    return update_scale_mod(sites)(msg, ctxt, lambda m, c: Message(reply, reply_to=m))


def _sent(reply: Message) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in reply.content[protocol.ARRAYS].items()}


def test_a_hostile_site_sends_the_adapter_received_plus_its_update_scaled() -> None:
    out = _sent(_round(partition=0, scale_of={0: 100.0}))
    # sent + 100·(trained − sent), by hand
    np.testing.assert_allclose(out["lora_B"], [[51.0, -98.0]])
    np.testing.assert_allclose(out["head"], [-24.5])


def test_honest_sites_and_evaluate_replies_pass_unchanged() -> None:
    for out in (
        _sent(_round(partition=1, scale_of={0: 100.0})),
        _sent(_round(partition=0, scale_of={0: 1.0})),
    ):
        np.testing.assert_array_equal(out["lora_B"], TRAINED["lora_B"])
    reply = _round(partition=0, scale_of={0: 100.0}, kind=MessageType.EVALUATE)
    np.testing.assert_array_equal(_sent(reply)["head"], TRAINED["head"])


def test_an_error_reply_is_left_alone() -> None:
    msg = Message(RecordDict({protocol.ARRAYS: _record(SENT)}), dst_node_id=1,
                  message_type=MessageType.TRAIN)  # fmt: skip
    ctxt = Context(run_id=1, node_id=1, node_config={PARTITION_ID: 0}, state=RecordDict(),
                   run_config={})  # fmt: skip
    failed = Message(Error(code=0, reason="crashed"), reply_to=msg)
    assert update_scale_mod({0: {UPDATE_SCALE: 100.0}})(msg, ctxt, lambda m, c: failed) is failed


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("100,1,1", [100.0, None, None]), ([1, -1, 1], [None, -1.0, None]), (2, [2.0] * 3)],
)
def test_update_scale_is_one_number_per_site_or_one_for_all(spec: object, expected: list) -> None:
    sites = site_settings({UPDATE_SCALE: spec}, _cfg())
    assert [s.get(UPDATE_SCALE) for s in sites.values()] == expected


@pytest.mark.parametrize("spec", ["100,1", "100,x,1", "inf,1,1", [1, 2, 3, 4]])
def test_a_bad_update_scale_names_the_setting_and_the_fix(spec: object) -> None:
    with pytest.raises(FedhavenError, match=r"'sites.update-scale' = .* is invalid: give 3 comma"):
        site_settings({UPDATE_SCALE: spec}, _cfg())
