"""What every fedhaven strategy adds to Flower's: :class:`Validated`, a mixin.

``class FedMedian(Validated, flwr.serverapp.strategy.FedMedian)`` is Flower's rule, plus:

* replies are checked against the outgoing allow-list and the adapter's shapes; a failing
  reply is logged and left out of the round instead of ending the run (Flower raises
  ``InconsistentMessageReplies`` and stops). So are updates with non-finite values or a
  weight that is not > 0, and replies whose metric keys differ from most sites' (Flower
  requires them equal, so one such reply would otherwise end the run);
* each site's own metrics (examples, ε, validation accuracy) and the bytes moved are kept
  per round, for the run report — Flower only keeps the weighted averages;
* a reply whose update is longer than ``federation.max-update-norm`` is rejected like an
  invalid one, after validation; each remaining update can be norm-bounded
  (:mod:`fedhaven.strategies.norm_bound`) before the rule;
* with ``stop_below_minimum`` (the ServerApp sets it), a training round in which fewer than
  ``min_train_nodes`` updates pass (the run's ``federation.min-sites``, capped at
  ``federation.sites``) stops the run with a :class:`~fedhaven.errors.FedhavenError`
  instead of going on with too few sites. Off by default, as in Flower's own strategies,
  where ``min_train_nodes`` only sets how many sites a round samples;
* with an :class:`~fedhaven.auditlog.AuditLog` as ``audit``, each round's sampled sites and
  every reply's fate (accepted with its bytes and examples; rejected, refused or failed with
  the reason) go to the run's audit log, and so does a stop for too few sites. Flower's
  Message API tells a strategy of no "connect" event: the sites a round samples for the
  first time are that round's ``sites`` in the log.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.fedopt import FedOpt

from fedhaven import auditlog, protocol
from fedhaven.auditlog import AuditLog
from fedhaven.errors import FedhavenError
from fedhaven.models import is_lora
from fedhaven.strategies.norm_bound import NormBounded

log = logging.getLogger(__name__)


class Validated(NormBounded):
    """Mixin: put it first in the bases, before the Flower strategy it extends."""

    def __init__(
        self, *, audit: AuditLog | None = None, stop_below_minimum: bool = False, **kwargs: Any
    ) -> None:
        kwargs.setdefault("weighted_by_key", protocol.NUM_EXAMPLES)
        kwargs.setdefault("arrayrecord_key", protocol.ARRAYS)
        kwargs.setdefault("configrecord_key", protocol.CONFIG)
        super().__init__(**kwargs)
        #: The run's audit log (the ServerApp may set it after construction); None: no log.
        self.audit = audit
        #: Stop the run when fewer than ``min_train_nodes`` updates of a round pass.
        self.stop_below_minimum = stop_below_minimum
        #: Seconds a round waits, before it samples, for sites of earlier rounds that are
        #: not connected now (a restarted site rejoining); 0: no wait (Flower's sampling).
        self.rejoin_wait_s = 0.0
        #: Under secure aggregation every reply carries the round's aggregate, not a site's
        #: update (fedhaven.strategies.secagg): no per-site norms to report.
        self.secure_aggregation = False
        self._expected: dict[str, tuple[int, ...]] = {}
        self._sent_bytes = 0
        # node -> (shapes, bytes) of the tensors sent to it this round: a rule may send each
        # node its own (flexlora: factors at the node's LoRA rank)
        self._sent_to: dict[int, tuple[dict[str, tuple[int, ...]], int]] = {}
        self._sampled: tuple[int, list[int]] = (0, [])  # (round, nodes sent instructions)
        # (round, the replies screen_train passed): a wrapper that screens a round before its
        # own work hands these on, and aggregate_train does not screen them again
        self._screened: tuple[int, list[Message]] | None = None
        self._seen: set[int] = set()  # nodes sampled in any round so far
        #: round -> node id -> {MessageType.TRAIN / EVALUATE: metrics of that site's reply}
        self.site_metrics: dict[int, dict[int, dict[str, dict[str, Any]]]] = {}
        #: round -> {"bytes_sent", "bytes_received", "sites_used", "rejected"}
        self.round_stats: dict[int, dict[str, float | None]] = {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on with this rule: nothing, for a rule that keeps
        no state across rounds (rules that do override this pair). ``site_metrics`` and
        ``round_stats`` are the run's history, which the checkpoint keeps as metrics lines."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._wait_for_rejoining(server_round, grid)
        self._expected = protocol.shapes(arrays)
        self._sent_bytes = protocol.record_nbytes(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        measured: dict[int, tuple[dict[str, tuple[int, ...]], int]] = {}
        self._sent_to = {}
        for m in messages:  # most rules send every node the same record: measure it once
            record = m.content[self.arrayrecord_key]
            if id(record) not in measured:
                measured[id(record)] = (protocol.shapes(record), protocol.record_nbytes(record))
            self._sent_to[m.metadata.dst_node_id] = measured[id(record)]
        nodes = [m.metadata.dst_node_id for m in messages]
        self._sampled = (server_round, nodes)
        new = sorted(set(nodes) - self._seen)
        self._seen.update(nodes)
        self._record(auditlog.ROUND_STARTED, round=server_round, nodes=sorted(nodes), sites=new)
        return messages

    def _wait_for_rejoining(self, server_round: int, grid: Grid) -> None:
        """Wait up to ``rejoin_wait_s`` for the sites sampled before that are not connected.

        A site restarted mid-round is refused by Flower until its old connection's
        heartbeats lapse, about when that round gives it up; Flower then samples the next
        round from whoever is connected at that instant, a few seconds before the site is
        back. A restarted site keeps its node id, so it is recognised when it returns."""
        if self.rejoin_wait_s <= 0 or not self._seen:
            return
        deadline = time.monotonic() + self.rejoin_wait_s
        missing = self._seen - set(grid.get_node_ids())
        if missing:
            log.info("round %d: waiting for sites %s to rejoin", server_round, sorted(missing))
        while missing and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            missing = self._seen - set(grid.get_node_ids())
        if missing:
            log.warning(
                "round %d: sites %s did not rejoin within federation.rejoin-wait (%g s): "
                "the round goes on without them",
                server_round,
                sorted(missing),
                self.rejoin_wait_s,
            )

    def _record(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, **fields)

    def expected_shapes(self, msg: Message) -> dict[str, tuple[int, ...]] | None:
        """The shapes a train reply must have: those of the tensors sent to its node
        (``None``: not checked, before any ``configure_train``)."""
        sent = self._sent_to.get(msg.metadata.src_node_id)
        return sent[0] if sent is not None else (self._expected or None)

    def _check(self, msg: Message, train: bool) -> None:
        """Raise ``ValueError`` if the reply must not go into the round."""
        expected = self.expected_shapes(msg) if train else None
        protocol.check_reply(msg.content, train=train, expected=expected)
        if not train:
            return
        metrics = msg.content[protocol.METRICS]
        weight = metrics.get(self.weighted_by_key)
        if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"'{self.weighted_by_key}' is {weight}, not a number > 0")
        site_weight = metrics.get(protocol.SITE_WEIGHT)
        if self.weighted_by_key == protocol.SITE_WEIGHT and site_weight != 1:
            raise ValueError(f"'{protocol.SITE_WEIGHT}' is {site_weight}, not 1")
        for k, a in msg.content[protocol.ARRAYS].items():
            if not np.isfinite(a.numpy()).all():
                raise ValueError(f"tensor '{k}' holds non-finite values")
        self.check_update_norm(msg)  # a valid update, but too long: rejected, not clipped

    def _accept(self, server_round: int, replies: Iterable[Message], train: bool) -> list[Message]:
        kind = MessageType.TRAIN if train else MessageType.EVALUATE
        accepted = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                refused = msg.error.code == protocol.REFUSED
                what = "refused" if refused else "failed"
                log.warning("round %d: site %d %s: %s", server_round, node, what, msg.error.reason)
                self._record(
                    auditlog.REPLY_REFUSED if refused else auditlog.REPLY_FAILED,
                    round=server_round,
                    kind=kind,
                    node=node,
                    code=msg.error.code,
                    reason=msg.error.reason,
                )
                continue
            try:
                self._check(msg, train)
            except ValueError as e:
                log.warning("round %d: rejected reply of site %d: %s", server_round, node, e)
                self._rejected(server_round, kind, node, str(e))
                continue
            accepted.append(msg)
        if train and accepted:  # Flower's rules need one set of metric keys
            keys = Counter(frozenset(m.content[protocol.METRICS].keys()) for m in accepted)
            common = keys.most_common(1)[0][0]
            for msg in [m for m in accepted if set(m.content[protocol.METRICS].keys()) != common]:
                why = (
                    f"its metrics {sorted(msg.content[protocol.METRICS].keys())} differ from "
                    f"most sites' {sorted(common)}"
                )
                log.warning(
                    "round %d: rejected reply of site %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    why,
                )
                self._rejected(server_round, kind, msg.metadata.src_node_id, why)
                accepted.remove(msg)
        for msg in accepted:
            node, metrics = msg.metadata.src_node_id, msg.content[protocol.METRICS]
            self.site_metrics.setdefault(server_round, {}).setdefault(node, {})[kind] = dict(
                metrics
            )
            self._record(
                auditlog.REPLY_ACCEPTED,
                round=server_round,
                kind=kind,
                node=node,
                bytes=protocol.record_nbytes(msg.content[protocol.ARRAYS]) if train else 0,
                examples=metrics[protocol.NUM_EXAMPLES],
            )
        return accepted

    def _rejected(self, server_round: int, kind: str, node: int, reason: str) -> None:
        self._record(
            auditlog.REPLY_REJECTED, round=server_round, kind=kind, node=node, reason=reason
        )

    def _unanswered(self, server_round: int, replies: list[Message]) -> None:
        """Log the sites this round's instructions went to that sent no reply at all."""
        sampled_round, nodes = self._sampled
        if sampled_round != server_round:
            return
        answered = {m.metadata.src_node_id for m in replies}
        for node in [n for n in nodes if n not in answered]:
            log.warning("round %d: site %d sent no reply in time", server_round, node)
            self._record(
                auditlog.REPLY_FAILED,
                round=server_round,
                kind=MessageType.TRAIN,
                node=node,
                code=None,
                reason="no reply within the round's timeout",
            )

    def _require_minimum(self, server_round: int, replies: list[Message], used: int) -> None:
        """With ``stop_below_minimum``, stop the run if fewer than ``min_train_nodes``
        updates went into the round."""
        asked = self._sampled[1] if self._sampled[0] == server_round else []
        if not self.stop_below_minimum or used >= self.min_train_nodes:
            return
        if not (asked or replies):
            return  # nothing was asked of any site (federation.fraction-train = 0)
        message = (
            f"round {server_round}: only {used} of the {self.min_train_nodes} sites required "
            "(federation.min-sites) sent a usable update: stopping; lower "
            "federation.min-sites or fix the sites (see the log)"
        )
        self._record(
            auditlog.RUN_STOPPED,
            round=server_round,
            reason=message,
            accepted=used,
            required=self.min_train_nodes,
        )
        raise FedhavenError(message)

    def screen_train(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The training replies that may go into the round, with the round's bookkeeping
        (``site_metrics``, ``round_stats``, the audit log) done, and the run stopped if too
        few pass. :meth:`aggregate_train` starts with it. A wrapper calls it first, before
        it touches the replies (clips them, say), and hands :meth:`aggregate_train` the
        replies it returned (or none at all): they are not screened twice."""
        accepted = self._accept(server_round, replies, train=True)
        norms = [] if self.secure_aggregation else self.update_norms(accepted)
        # before the rule: Flower's FedMedian and FedTrimmedAvg pop the arrays from the replies
        self.round_stats[server_round] = {
            "bytes_sent": sum(
                self._sent_to.get(m.metadata.src_node_id, ({}, self._sent_bytes))[1]
                for m in replies
            ),
            "bytes_received": sum(
                protocol.record_nbytes(m.content[protocol.ARRAYS]) for m in accepted
            ),
            "sites_used": len(accepted),
            "rejected": len(replies) - len(accepted),
            # what a coordinator needs to pick federation.update-norm-bound, and to see a
            # hostile site: the spread of the accepted updates' L2 norms
            "update_norm_median": float(np.median(norms)) if norms else None,
            "update_norm_max": max(norms, default=None),
        }
        self._unanswered(server_round, replies)
        self._require_minimum(server_round, replies, len(accepted))
        self._screened = (server_round, accepted)
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = list(replies)
        screened, self._screened = self._screened, None
        if not _same(screened, server_round, accepted):  # not screened by a wrapper
            accepted = self.screen_train(server_round, accepted)
            self._screened = None
        if not accepted:
            return None, None
        return super().aggregate_train(server_round, accepted)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        # Sites without a validation split report only their (zero) example count.
        accepted = [
            m
            for m in self._accept(server_round, replies, train=False)
            if m.content[protocol.METRICS][protocol.NUM_EXAMPLES]
        ]
        if not accepted:
            return None
        # Validation metrics average over examples, whatever weighs the training updates
        # (under central DP every site's update counts the same).
        return self.evaluate_metrics_aggr_fn([m.content for m in accepted], protocol.NUM_EXAMPLES)


def _same(
    screened: tuple[int, list[Message]] | None, server_round: int, replies: list[Message]
) -> bool:
    """Whether ``replies`` are the very messages ``screened`` passed in ``server_round``."""
    if screened is None or screened[0] != server_round or len(screened[1]) != len(replies):
        return False
    return all(a is b for a, b in zip(screened[1], replies, strict=True))


class ServerOptimizer(FedOpt):
    """Mixin for Flower's FedOpt rules (FedAdam, FedYogi), first in the bases:

    * ``state_dict`` / ``load_state_dict`` of the server optimizer: its first and second
      moments ``m_t``, ``v_t`` (key -> array, or None before round 1). The arrays sent in
      the current round (``current_arrays``) are not state: each round's
      ``configure_train`` sets them from the global model.
    * the new global arrays keep the dtype of the arrays sent: Flower's step mixes in
      float64 scalars, which under NumPy 2 would turn a float32 adapter into a float64 one
      (twice the bytes to every site, every round).
    * the server step moves the LoRA tensors only; the tensors trained in full (the head,
      ``lora.modules-to-save``) take the sites' weighted mean, as under FedAvg. Adam's step
      moves each coordinate by about η whatever the update's size, and the sites move the
      head with a learning rate 600× LoRA's under DP (3× without): no one η serves both.
      At ε=8 on the demo, η = 0.01 over every tensor left the head near its start (every
      prediction the majority class), η = 1 diverged (BENCHMARKS.md, strategies).
    """

    def _compute_deltat_and_mt(
        self, aggregated_arrayrecord: ArrayRecord
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
        # Private hook: Flower 1.42 exposes the weighted mean nowhere else (test_flower_hooks.py).
        # Flower's FedOpt step begins here with the sites' weighted mean: keep it for the
        # tensors the step leaves alone
        delta_t, m_t, mean = super()._compute_deltat_and_mt(aggregated_arrayrecord)
        self._mean = mean
        return delta_t, m_t, mean

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self._mean: dict[str, np.ndarray] = {}
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.current_arrays is None:
            return arrays, metrics
        dtypes = {k: v.dtype for k, v in self.current_arrays.items()}
        stepped = {k: a.numpy() if is_lora(k) else self._mean[k] for k, a in arrays.items()}
        cast = {k: Array(np.asarray(a, dtype=dtypes[k])) for k, a in stepped.items()}
        return ArrayRecord(cast), metrics

    def state_dict(self) -> dict[str, dict[str, np.ndarray] | None]:
        return {
            name: None if moment is None else {k: v.copy() for k, v in moment.items()}
            for name, moment in (("m_t", self.m_t), ("v_t", self.v_t))
        }

    def load_state_dict(self, state: dict[str, dict[str, np.ndarray] | None]) -> None:
        for name in ("m_t", "v_t"):
            moment = state[name]
            setattr(
                self,
                name,
                None if moment is None else {k: np.array(v, copy=True) for k, v in moment.items()},
            )
