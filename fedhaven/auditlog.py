"""The audit log: what happened in a run, one JSON event a line, appended and never rewritten.

Two kinds of log use it:

* the coordinator's ``<run dir>/audit-log.jsonl``: the run's start and end, each round's
  sampled sites, every site's reply to it (accepted, with its bytes and examples; rejected,
  refused or failed, with the reason), the checkpoints written, and why a run stopped;
* a site's ``<state-dir>/audit-log.jsonl``: what the site itself sent (tensor count and
  bytes, metric names, ε after the round), the rounds it refused, and the counts of its
  data checks. Never any data.

Each line is ``{"time": <UTC ISO 8601>, "event": <name>, <fields>...}``. Every line is
fsync'ed before :meth:`AuditLog.record` returns, like the privacy ledger
(:class:`fedhaven.privacy.Ledger`). A crash can leave only the last line torn: reading skips
it, and the next event starts on a line of its own. Event names and their fields are the
constants below: no other module spells one.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# AUDIT_FILE: the log's file name, in the coordinator's run directory and in a site's state
# directory (the run record owns the run directory's names).
from fedhaven.run_record import AUDIT_FILE as AUDIT_FILE

log = logging.getLogger(__name__)

# Keys every event has.
TIME = "time"
EVENT = "event"

# --- coordinator events -------------------------------------------------------------------
#: The run begins: strategy, rounds, sites, min_sites (written by the ServerApp).
RUN_STARTED = "run_started"
#: A training round's instructions are out: round, nodes (sampled), and sites: the nodes
#: seen for the first time in this run. Flower's Message API tells a strategy of no
#: "connect" event; a site's first sampling is the first the coordinator knows of it.
ROUND_STARTED = "round_started"
#: A site's reply went into the round: round, kind (train / evaluate), node, bytes, examples.
REPLY_ACCEPTED = "reply_accepted"
#: A reply failed validation and was left out: round, kind, node, reason.
REPLY_REJECTED = "reply_rejected"
#: A site refused the round on its own terms (error code protocol.REFUSED, e.g. its privacy
#: budget): round, kind, node, code, reason.
REPLY_REFUSED = "reply_refused"
#: A site's reply was an error, or never came: round, kind, node, code, reason.
REPLY_FAILED = "reply_failed"
#: The coordinator wrote a checkpoint or the final adapter: round, path.
CHECKPOINT_WRITTEN = "checkpoint_written"
#: The run ended normally: rounds, stopped_early, the final global metrics.
RUN_FINISHED = "run_finished"
#: The run was stopped: round, reason (and, for too few sites, accepted and required).
RUN_STOPPED = "run_stopped"

# --- site events --------------------------------------------------------------------------
#: The site sent a training update: run_id, round, tensors, bytes, metrics (names), epsilon,
#: and where the message's time went (TIMINGS).
SENT = "sent"
#: A sent event's timings: since the site's process started (a deployed site starts one per
#: message), in the train handler, and in training itself; seconds.
TIMINGS, PROCESS_S, HANDLER_S, TRAIN_S = "timings", "process_s", "handler_s", "train_s"
#: The site refused a round: run_id, round, reason.
REFUSED = "refused"
#: The site checked its data file, once per run: run_id and the counts of
#: :meth:`fedhaven.datacheck.DataReport.to_dict` (never a row's content).
DATA_CHECKED = "data_checked"

COORDINATOR_EVENTS = frozenset(
    {
        RUN_STARTED,
        ROUND_STARTED,
        REPLY_ACCEPTED,
        REPLY_REJECTED,
        REPLY_REFUSED,
        REPLY_FAILED,
        CHECKPOINT_WRITTEN,
        RUN_FINISHED,
        RUN_STOPPED,
    }
)
SITE_EVENTS = frozenset({SENT, REFUSED, DATA_CHECKED})
EVENTS = COORDINATOR_EVENTS | SITE_EVENTS


class AuditLog:
    """An append-only JSON-lines event log at ``path`` (created, with its folder, on the
    first event)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event, on disk (fsync'ed) when this returns; returns the entry."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}: add it to fedhaven.auditlog")
        clash = {TIME, EVENT} & set(fields)
        if clash:
            raise ValueError(f"audit event fields may not be named {sorted(clash)}")
        entry = {TIME: datetime.now(UTC).isoformat(timespec="milliseconds"), EVENT: event}
        entry.update(fields)
        line = json.dumps(entry, default=_jsonable) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            if f.tell() and not _ends_with_newline(self.path):
                line = "\n" + line  # a crash tore the last line: start on a fresh one
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return entry

    def entries(self, event: str | None = None) -> list[dict[str, Any]]:
        """Every event in the order written (only those named ``event``, if given).

        A line that is not a JSON object (a write a crash tore) is skipped; one that is not
        the last line is also logged, since only the last line can be torn by a crash.
        """
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        out = []
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if not isinstance(entry, dict):
                if i != len(lines) - 1 and line.strip():
                    log.warning("%s line %d is not a JSON event: skipped", self.path, i + 1)
                continue
            if event is None or entry.get(EVENT) == event:
                out.append(entry)
        return out


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _jsonable(value: Any) -> Any:
    """NumPy scalars (``.item()``), paths and sets; anything else is an error."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"audit event field of type {type(value).__name__} is not JSON")
