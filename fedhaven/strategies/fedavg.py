"""FedAvg over the adapter tensors, weighted by examples — Flower's FedAvg, plus:

* replies are checked against the outgoing allow-list and the adapter's shapes; a failing
  reply is logged and left out of the round instead of ending the run (Flower raises
  ``InconsistentMessageReplies`` and stops);
* each site's own metrics (examples, ε, validation accuracy) and the bytes moved are kept
  per round, for the run report — Flower only keeps the weighted averages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedhaven import protocol

log = logging.getLogger(__name__)


class FedAvg(FlowerFedAvg):
    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("weighted_by_key", protocol.NUM_EXAMPLES)
        kwargs.setdefault("arrayrecord_key", protocol.ARRAYS)
        kwargs.setdefault("configrecord_key", protocol.CONFIG)
        super().__init__(**kwargs)
        self._expected: dict[str, tuple[int, ...]] = {}
        self._sent_bytes = 0
        #: round -> node id -> {MessageType.TRAIN / EVALUATE: metrics of that site's reply}
        self.site_metrics: dict[int, dict[int, dict[str, dict[str, Any]]]] = {}
        #: round -> {"bytes_sent", "bytes_received", "sites_used", "rejected"}
        self.round_stats: dict[int, dict[str, int]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._expected = protocol.shapes(arrays)
        self._sent_bytes = protocol.record_nbytes(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _accept(self, server_round: int, replies: Iterable[Message], train: bool) -> list[Message]:
        accepted = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                what = "refused" if msg.error.code == protocol.REFUSED else "failed"
                log.warning("round %d: site %d %s: %s", server_round, node, what, msg.error.reason)
                continue
            try:
                protocol.check_reply(msg.content, train=train, expected=self._expected or None)
                weight = msg.content[protocol.METRICS].get(protocol.SITE_WEIGHT)
                if train and self.weighted_by_key == protocol.SITE_WEIGHT and weight != 1:
                    raise ValueError(f"'{protocol.SITE_WEIGHT}' is {weight}, not 1")
            except ValueError as e:
                log.warning("round %d: rejected reply of site %d: %s", server_round, node, e)
                continue
            accepted.append(msg)
            site = self.site_metrics.setdefault(server_round, {}).setdefault(node, {})
            kind = MessageType.TRAIN if train else MessageType.EVALUATE
            site[kind] = dict(msg.content[protocol.METRICS])
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        accepted = self._accept(server_round, replies, train=True)
        self.round_stats[server_round] = {
            "bytes_sent": self._sent_bytes * len(replies),
            "bytes_received": sum(
                protocol.record_nbytes(m.content[protocol.ARRAYS]) for m in accepted
            ),
            "sites_used": len(accepted),
            "rejected": len(replies) - len(accepted),
        }
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
