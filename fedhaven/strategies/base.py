"""What every fedhaven strategy adds to Flower's: :class:`Validated`, a mixin.

``class FedMedian(Validated, flwr.serverapp.strategy.FedMedian)`` is Flower's rule, plus:

* replies are checked against the outgoing allow-list and the adapter's shapes; a failing
  reply is logged and left out of the round instead of ending the run (Flower raises
  ``InconsistentMessageReplies`` and stops). So are updates with non-finite values or a
  weight that is not > 0, and replies whose metric keys differ from most sites' (Flower
  requires them equal, so one such reply would otherwise end the run);
* each site's own metrics (examples, ε, validation accuracy) and the bytes moved are kept
  per round, for the run report — Flower only keeps the weighted averages;
* each site's update can be norm-bounded (:mod:`fedhaven.strategies.norm_bound`), after
  validation and before the rule.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.fedopt import FedOpt

from fedhaven import protocol
from fedhaven.strategies.norm_bound import NormBounded

log = logging.getLogger(__name__)


class Validated(NormBounded):
    """Mixin: put it first in the bases, before the Flower strategy it extends."""

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

    def _check(self, msg: Message, train: bool) -> None:
        """Raise ``ValueError`` if the reply must not go into the round."""
        protocol.check_reply(msg.content, train=train, expected=self._expected or None)
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

    def _accept(self, server_round: int, replies: Iterable[Message], train: bool) -> list[Message]:
        accepted = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                what = "refused" if msg.error.code == protocol.REFUSED else "failed"
                log.warning("round %d: site %d %s: %s", server_round, node, what, msg.error.reason)
                continue
            try:
                self._check(msg, train)
            except ValueError as e:
                log.warning("round %d: rejected reply of site %d: %s", server_round, node, e)
                continue
            accepted.append(msg)
        if train and accepted:  # Flower's rules need one set of metric keys
            keys = Counter(frozenset(m.content[protocol.METRICS].keys()) for m in accepted)
            common = keys.most_common(1)[0][0]
            for msg in [m for m in accepted if set(m.content[protocol.METRICS].keys()) != common]:
                log.warning(
                    "round %d: rejected reply of site %d: its metrics %s differ from most "
                    "sites' %s",
                    server_round,
                    msg.metadata.src_node_id,
                    sorted(msg.content[protocol.METRICS].keys()),
                    sorted(common),
                )
                accepted.remove(msg)
        kind = MessageType.TRAIN if train else MessageType.EVALUATE
        for msg in accepted:
            site = self.site_metrics.setdefault(server_round, {})
            site.setdefault(msg.metadata.src_node_id, {})[kind] = dict(
                msg.content[protocol.METRICS]
            )
        return accepted

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        accepted = self._accept(server_round, replies, train=True)
        # before the rule: Flower's FedMedian and FedTrimmedAvg pop the arrays from the replies
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


class ServerOptimizer(FedOpt):
    """Mixin for Flower's FedOpt rules (FedAdam, FedYogi), first in the bases:

    * ``state_dict`` / ``load_state_dict`` of the server optimizer: its first and second
      moments ``m_t``, ``v_t`` (key -> array, or None before round 1). The arrays sent in
      the current round (``current_arrays``) are not state: each round's
      ``configure_train`` sets them from the global model.
    * the new global arrays keep the dtype of the arrays sent: Flower's step mixes in
      float64 scalars, which under NumPy 2 would turn a float32 adapter into a float64 one
      (twice the bytes to every site, every round).
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.current_arrays is None:
            return arrays, metrics
        dtypes = {k: v.dtype for k, v in self.current_arrays.items()}
        cast = {k: Array(np.asarray(a.numpy(), dtype=dtypes[k])) for k, a in arrays.items()}
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
