"""Secure aggregation: what the config refuses, and the SecAgg+ allow-list of a site's
replies (the protocol itself runs end to end in tests/integration)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from fedhaven import protocol
from fedhaven.client.mods import secure_aggregation_mod
from fedhaven.config import from_flat
from fedhaven.errors import FedhavenError

ON = {"federation.secure-aggregation": True}


@pytest.mark.parametrize(
    ("flat", "key"),
    [
        ({"federation.strategy": "fedmedian"}, "federation.strategy"),
        ({"federation.strategy": "trimmedavg"}, "federation.strategy"),
        ({"federation.strategy": "krum"}, "federation.strategy"),
        ({"federation.strategy": "flexlora"}, "federation.strategy"),
        ({"federation.update-norm-bound": 1.0}, "federation.update-norm-bound"),
        ({"federation.max-update-norm": 1.0}, "federation.max-update-norm"),
        ({"federation.min-sites": 1}, "federation.min-sites"),
        ({"federation.sites": 1}, "federation.min-sites"),
        ({"privacy.central": "server-fixed"}, "privacy.central"),
        ({"privacy.central": "server-adaptive"}, "privacy.central"),
        ({"federation.secagg-clip": 0.0}, "federation.secagg-clip"),
        ({"federation.secagg-max-weight": -1.0}, "federation.secagg-max-weight"),
    ],
)
def test_what_secure_aggregation_cannot_serve_is_refused_in_one_line(
    flat: dict[str, object], key: str
) -> None:
    with pytest.raises(FedhavenError) as e:
        from_flat({**ON, **flat})
    message = str(e.value)
    assert f"'{key}'" in message and "\n" not in message
    if key.startswith("federation.secagg"):
        return
    assert "secure" in message or "SecAgg+" in message  # says why, and the way out


@pytest.mark.parametrize(
    "flat",
    [
        {},
        {"federation.strategy": "ffa"},
        {"federation.strategy": "fedprox"},
        {"federation.strategy": "fedadam"},
        {"federation.strategy": "fedyogi"},
        {"privacy.central": "client-fixed", "federation.sites": 2},
        {"privacy.central": "client-adaptive", "federation.sites": 2},
    ],
)
def test_the_linear_rules_run_under_secure_aggregation(flat: dict[str, object]) -> None:
    assert from_flat({**ON, **flat}).federation.secure_aggregation


def _collect_reply(**records: object) -> RecordDict:
    content = RecordDict(
        {
            protocol.SECAGG: ConfigRecord({Key.MASKED_PARAMETERS: [b"\x00" * 8]}),
            protocol.FITRES_PARAMETERS: ArrayRecord(),
            protocol.FITRES_METRICS: ConfigRecord({protocol.NUM_EXAMPLES: 5}),
        }
    )
    for name, record in records.items():
        content[name] = record  # type: ignore[assignment]
    return content


def test_a_masked_reply_passes_the_secagg_allow_list() -> None:
    protocol.check_secagg_reply(_collect_reply(), Stage.COLLECT_MASKED_VECTORS)
    keys = ConfigRecord({Key.PUBLIC_KEY_1: b"a", Key.PUBLIC_KEY_2: b"b"})
    protocol.check_secagg_reply(RecordDict({protocol.SECAGG: keys}), Stage.SETUP)


@pytest.mark.parametrize(
    ("content", "stage", "reason"),
    [
        (
            _collect_reply(
                **{protocol.FITRES_PARAMETERS: ArrayRecord({"w": Array(np.ones(3, np.float32))})}
            ),
            Stage.COLLECT_MASKED_VECTORS,
            "unmasked tensors",
        ),
        (
            _collect_reply(**{protocol.ARRAYS: ArrayRecord()}),
            Stage.COLLECT_MASKED_VECTORS,
            "carries records",
        ),
        (
            _collect_reply(**{protocol.FITRES_METRICS: ConfigRecord({"raw-text": 1.0})}),
            Stage.COLLECT_MASKED_VECTORS,
            "metrics outside the allow-list",
        ),
        (_collect_reply(), Stage.SETUP, "carries records"),
        (
            RecordDict({protocol.SECAGG: ConfigRecord({Key.MASKED_PARAMETERS: [b"x"]})}),
            Stage.UNMASK,
            "stage 'unmask' carries",
        ),
    ],
)
def test_a_secagg_reply_with_anything_else_is_refused(
    content: RecordDict, stage: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        protocol.check_secagg_reply(content, stage)


@pytest.mark.usefixtures("flower_identity")
def test_the_mod_lets_a_plain_train_round_pass() -> None:
    content = RecordDict({protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1})})
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    reply = Message(RecordDict(), reply_to=msg)
    ctxt = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert secure_aggregation_mod(msg, ctxt, lambda m, c: reply) is reply


def test_legacy_fit_instructions_keep_names_order_and_values() -> None:
    from flwr.compat.common import recorddict_compat as compat

    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(2, np.float32)}
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 3}),
        }
    )
    fitins = protocol.legacy_fit_ins(content, protocol.NUM_EXAMPLES)
    back, keys, weight = protocol.from_legacy_fit_ins(compat.fitins_to_recorddict(fitins, True))
    assert keys == ["b", "a"] and weight == protocol.NUM_EXAMPLES
    assert dict(back[protocol.CONFIG]) == {protocol.SERVER_ROUND: 3}
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[protocol.ARRAYS][k].numpy(), v)
