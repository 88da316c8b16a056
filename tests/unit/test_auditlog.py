"""The audit log: append-only JSON lines; the coordinator's record of every round and reply
(the Validated mixin), the stop for too few sites, and a site's record of what it sent."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from test_fedavg import W1, FakeGrid, error_reply, instruction, reply

from fedhaven import auditlog, protocol
from fedhaven.auditlog import AUDIT_FILE, AuditLog
from fedhaven.client.app import handle_train
from fedhaven.config import DATA_PATH, EPSILON_BUDGET, LABEL_RULE, STATE_DIR, Config
from fedhaven.errors import FedhavenError
from fedhaven.models import adapter_state, build_model
from fedhaven.strategies import FedAvg

ZERO = torch.zeros(2, 2)


# --- the log itself -------------------------------------------------------------------------


def test_events_are_appended_and_read_back_in_order_with_their_fields(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "run" / AUDIT_FILE)
    assert log.entries() == []
    log.record(auditlog.ROUND_STARTED, round=1, nodes=[3, 1], sites=[1, 3])
    log.record(auditlog.REPLY_ACCEPTED, round=1, kind="train", node=3, bytes=16, examples=5)
    log.record(auditlog.REPLY_REFUSED, round=1, kind="train", node=1, code=100, reason="ε")
    entries = log.entries()
    assert [e["event"] for e in entries] == [
        auditlog.ROUND_STARTED,
        auditlog.REPLY_ACCEPTED,
        auditlog.REPLY_REFUSED,
    ]
    assert entries[1] | {"time": None} == {
        "time": None,
        "event": auditlog.REPLY_ACCEPTED,
        "round": 1,
        "kind": "train",
        "node": 3,
        "bytes": 16,
        "examples": 5,
    }
    times = [datetime.fromisoformat(e["time"]) for e in entries]
    assert all(t.utcoffset() == UTC.utcoffset(None) for t in times) and times == sorted(times)
    assert [e["node"] for e in log.entries(auditlog.REPLY_REFUSED)] == [1]
    assert len(log.path.read_text().splitlines()) == 3  # one event a line


def test_unknown_events_and_reserved_field_names_are_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / AUDIT_FILE)
    with pytest.raises(ValueError, match="unknown audit event"):
        log.record("round_sneezed")
    with pytest.raises(ValueError, match="may not be named"):
        log.record(auditlog.RUN_FINISHED, time="now")
    assert not log.path.exists()


def test_a_torn_last_line_is_skipped_and_the_next_event_starts_a_line_of_its_own(
    tmp_path: Path,
) -> None:
    log = AuditLog(tmp_path / AUDIT_FILE)
    log.record(auditlog.SENT, run_id=1, round=1, tensors=2, bytes=64, metrics=[], epsilon=0.5)
    with log.path.open("a") as f:
        f.write('{"time": "2026-11-25T00:00:00", "event": "se')  # a crash mid-write
    assert [e["round"] for e in log.entries()] == [1]
    log.record(auditlog.REFUSED, run_id=1, round=2, reason="budget")
    assert [(e["event"], e["round"]) for e in log.entries()] == [
        (auditlog.SENT, 1),
        (auditlog.REFUSED, 2),
    ]


# --- the coordinator: the Validated mixin ---------------------------------------------------


def _refusal(node: int, reason: str = "privacy budget exhausted: allowed ε=1") -> Message:
    return Message(Error(code=protocol.REFUSED, reason=reason), reply_to=instruction(node))


def _start(strategy: FedAvg, server_round: int, nodes: list[int]) -> None:
    sent = ArrayRecord({"w": ZERO})
    list(strategy.configure_train(server_round, sent, ConfigRecord(), FakeGrid(nodes)))


@pytest.mark.usefixtures("flower_identity")
def test_the_mixin_records_each_round_and_every_replys_fate(tmp_path: Path) -> None:
    strategy = FedAvg(min_train_nodes=1, min_available_nodes=1)
    strategy.audit = log = AuditLog(tmp_path / AUDIT_FILE)  # as the ServerApp attaches it
    _start(strategy, 1, [11, 22, 33, 44, 55, 66, 77])
    replies = [
        reply(11, {"w": W1}, num_examples=3, train_loss=0.5),
        reply(22, {"w": torch.ones(2, 3)}, num_examples=3, train_loss=0.5),  # wrong shape
        error_reply(33),
        _refusal(44),
        reply(66, {"w": W1}, num_examples=4),  # metrics differ from the other sites'
        reply(77, {"w": W1}, num_examples=5, train_loss=0.7),
        # 55 never answers
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    strategy.aggregate_evaluate(1, [reply(11, None, num_examples=7, accuracy=0.5)])
    _start(strategy, 2, [11, 22, 33, 44, 55, 66, 77, 88])  # 88: a site seen for the first time

    events = [(e["event"], e.get("node")) for e in log.entries()]
    assert events == [
        (auditlog.ROUND_STARTED, None),
        (auditlog.REPLY_REJECTED, 22),
        (auditlog.REPLY_FAILED, 33),
        (auditlog.REPLY_REFUSED, 44),
        (auditlog.REPLY_REJECTED, 66),
        (auditlog.REPLY_ACCEPTED, 11),
        (auditlog.REPLY_ACCEPTED, 77),
        (auditlog.REPLY_FAILED, 55),
        (auditlog.REPLY_ACCEPTED, 11),
        (auditlog.ROUND_STARTED, None),
    ]
    e = {(x["event"], x.get("node"), x.get("round"), x.get("kind")): x for x in log.entries()}
    first = e[auditlog.ROUND_STARTED, None, 1, None]
    assert first["nodes"] == first["sites"] == [11, 22, 33, 44, 55, 66, 77]
    second = e[auditlog.ROUND_STARTED, None, 2, None]
    assert second["nodes"] == [11, 22, 33, 44, 55, 66, 77, 88] and second["sites"] == [88]
    accepted = e[auditlog.REPLY_ACCEPTED, 11, 1, "train"]
    assert accepted["bytes"] == protocol.record_nbytes(ArrayRecord({"w": W1})) > 0
    assert accepted["examples"] == 3
    evaluated = e[auditlog.REPLY_ACCEPTED, 11, 1, "evaluate"]
    assert (evaluated["bytes"], evaluated["examples"]) == (0, 7)
    assert "shape" in e[auditlog.REPLY_REJECTED, 22, 1, "train"]["reason"]
    assert "differ from most sites'" in e[auditlog.REPLY_REJECTED, 66, 1, "train"]["reason"]
    failed = e[auditlog.REPLY_FAILED, 33, 1, "train"]
    assert (failed["code"], failed["reason"]) == (0, "site crashed")
    refused = e[auditlog.REPLY_REFUSED, 44, 1, "train"]
    assert refused["code"] == protocol.REFUSED and "budget exhausted" in refused["reason"]
    silent = e[auditlog.REPLY_FAILED, 55, 1, "train"]
    assert silent["code"] is None and "no reply" in silent["reason"]


def _too_few_message(server_round: int, k: int, m: int) -> str:
    return (
        f"round {server_round}: only {k} of the {m} sites required (federation.min-sites) sent "
        "a usable update: stopping; lower federation.min-sites or fix the sites (see the log)"
    )


@pytest.mark.usefixtures("flower_identity")
def test_fewer_updates_than_the_minimum_stop_the_run_and_are_logged(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / AUDIT_FILE)
    strategy = FedAvg(min_train_nodes=2, min_available_nodes=3, audit=log, stop_below_minimum=True)
    _start(strategy, 1, [11, 22, 33])
    ok = [reply(11, {"w": W1}, num_examples=1), reply(22, {"w": W1}, num_examples=2)]
    arrays, _ = strategy.aggregate_train(1, [*ok, _refusal(33)])  # 2 of 2 required: on
    assert arrays is not None
    _start(strategy, 2, [11, 22, 33])
    expected = _too_few_message(2, 1, 2)
    with pytest.raises(FedhavenError, match=re.escape(expected)) as raised:
        strategy.aggregate_train(2, [ok[0], error_reply(22), _refusal(33)])
    assert str(raised.value) == expected and "\n" not in expected
    (stopped,) = log.entries(auditlog.RUN_STOPPED)
    assert stopped["round"] == 2 and stopped["reason"] == expected
    assert (stopped["accepted"], stopped["required"]) == (1, 2)
    assert log.entries()[-1]["event"] == auditlog.RUN_STOPPED  # after the round's replies


@pytest.mark.usefixtures("flower_identity")
def test_without_stop_below_minimum_a_thin_round_goes_on_as_in_flower() -> None:
    strategy = FedAvg(min_train_nodes=2, min_available_nodes=2)
    _start(strategy, 1, [11, 22])
    arrays, _ = strategy.aggregate_train(1, [reply(11, {"w": W1}, num_examples=1), _refusal(22)])
    assert arrays is not None and strategy.round_stats[1]["sites_used"] == 1


# --- the site -------------------------------------------------------------------------------


def _instruction(cfg: Config, server_round: int) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: protocol.to_record(adapter_state(build_model(cfg))),
            protocol.CONFIG: protocol.train_config(server_round),
        }
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _site(state: Path, **node: object) -> Context:
    base = {"partition-id": 0, "num-partitions": 2, STATE_DIR: str(state)}
    return Context(
        run_id=7, node_id=1, node_config={**base, **node}, state=RecordDict(), run_config={}
    )


@pytest.mark.usefixtures("flower_identity")
def test_the_site_records_what_it_sent_and_what_it_refused(
    tiny_cfg: Config, tmp_path: Path
) -> None:
    cfg = tiny_cfg.replace(**{"privacy.enabled": True})
    log = AuditLog(tmp_path / AUDIT_FILE)
    sent = handle_train(_instruction(cfg, 1), _site(tmp_path, **{EPSILON_BUDGET: 1000.0}), cfg)
    (entry,) = log.entries()
    arrays, metrics = sent.content[protocol.ARRAYS], sent.content[protocol.METRICS]
    assert entry["event"] == auditlog.SENT
    assert (entry["run_id"], entry["round"]) == (7, 1)
    assert entry["tensors"] == len(arrays)
    assert entry["bytes"] == protocol.record_nbytes(arrays)
    assert entry["metrics"] == sorted(metrics.keys())
    assert entry["epsilon"] == metrics[protocol.EPSILON] > 0
    # what was sent and where the message's time went, never the data: exactly these fields
    assert set(entry) == {"time", "event", "run_id", "round", "tensors", "bytes", "metrics"} | {
        "epsilon",
        "timings",
    }
    timings = entry["timings"]
    assert set(timings) == {"process_s", "handler_s", "train_s"}
    assert 0 < timings["train_s"] <= timings["handler_s"] < timings["process_s"] + 3600

    refused = handle_train(_instruction(cfg, 2), _site(tmp_path, **{EPSILON_BUDGET: 1e-3}), cfg)
    assert refused.has_error() and refused.error.code == protocol.REFUSED
    assert [e["event"] for e in log.entries()] == [auditlog.SENT, auditlog.REFUSED]
    last = log.entries()[-1]
    assert (last["run_id"], last["round"]) == (7, 2)
    assert last["reason"] == refused.error.reason and "budget exhausted" in last["reason"]


@pytest.mark.usefixtures("flower_identity")
def test_a_deployed_site_records_its_data_checks_once_per_run(
    tiny_cfg: Config, tmp_path: Path, make_rows: Callable[..., pd.DataFrame]
) -> None:
    # 30 rows (10 a label), plus a copy of row 0, a "Positive " variant (mapped by the site's
    # rule) and a label outside the set: 33 in, 31 kept.
    df = make_rows(30, seed=1)
    extra = [df.iloc[0].tolist(), ["good relief the", "Positive "], ["the pill", "ecstatic"]]
    df = pd.concat([df, pd.DataFrame(extra, columns=df.columns)], ignore_index=True)
    data = tmp_path / "site.csv"
    df.to_csv(data, index=False)
    node = {DATA_PATH: str(data), STATE_DIR: str(tmp_path), LABEL_RULE: "map"}
    context = Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config={})
    cfg, log = tiny_cfg.replace(**{"privacy.enabled": False}), AuditLog(tmp_path / AUDIT_FILE)
    for server_round in (1, 2):
        reply = handle_train(_instruction(cfg, server_round), context, cfg)
    (checked,) = log.entries(auditlog.DATA_CHECKED)  # once, not every round
    assert checked["run_id"] == 7
    assert (checked["rows_in"], checked["rows_kept"], checked["labels_mapped"]) == (33, 31, 1)
    assert checked["dropped"]["exact_duplicate"] == 1
    assert checked["dropped"]["unknown_label"] == 1
    assert checked["per_label"] == {"negative": 10, "neutral": 10, "positive": 11}
    assert "ecstatic" not in (tmp_path / AUDIT_FILE).read_text()  # counts, never content
    metrics = reply.content[protocol.METRICS]
    assert metrics[protocol.DATA_ROWS] == 31
    assert metrics[protocol.DATA_ROWS_IN] == 33
    assert metrics[protocol.DATA_DROPPED] == 2
    assert metrics[protocol.DATA_DUPLICATES] == 1
    assert metrics[protocol.DATA_SMALL_CLASSES] == 0
