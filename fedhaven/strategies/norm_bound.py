"""Norm bounding: clip each site's update to an L2 bound before the aggregation rule sees it.

A site's update is its reply minus the adapter the coordinator sent it, over all the tensors
at once (the bound is on the whole update, as in Sun et al., 2019, "Can you really backdoor
federated learning?"). An update within the bound is left as it is; a longer one keeps its
direction and gets the bound's length. No single site can then move the aggregate further
than ``weight × bound``, whatever it sends. It composes with every rule: it is a mixin that
every fedhaven strategy has through :class:`~fedhaven.strategies.base.Validated`, off (0)
unless ``federation.update-norm-bound`` sets it.

An update longer than ``federation.max-update-norm`` (off at 0) is not clipped but rejected:
:meth:`NormBounded.check_update_norm` raises, and ``Validated`` leaves the reply out of the
round like any invalid one. Between the two bounds an update is clipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

log = logging.getLogger(__name__)


def _update(
    reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], float]:
    """``reply − sent`` per tensor, and its L2 norm over all the tensors at once."""
    update = {k: np.asarray(reply[k]) - sent[k] for k in sent}
    norm = math.sqrt(sum(float(np.square(u, dtype=np.float64).sum()) for u in update.values()))
    return update, norm


def update_norm(reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of a site's update ``reply − sent``, over all the tensors at once."""
    return _update(reply, sent)[1]


def bound_update(
    reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], bound: float
) -> tuple[dict[str, np.ndarray], float]:
    """``sent + clip(reply − sent, bound)`` per tensor, and the update's norm before clipping."""
    update, norm = _update(reply, sent)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: (sent[k] + update[k] * scale).astype(sent[k].dtype) for k in sent}, norm


class NormBounded(FlowerFedAvg):
    """Mixin (first in the bases, before a Flower strategy): bounds every train reply's update.

    Subclasses ``FedAvg`` only so that ``super()`` is typed; in ``class X(NormBounded,
    flwr.serverapp.strategy.FedMedian)`` Python's MRO runs this, then ``FedMedian``'s hooks.
    Replies reach it already validated (keys and shapes match what was sent).
    """

    def __init__(
        self, *, update_norm_bound: float = 0.0, max_update_norm: float = 0.0, **kwargs: Any
    ) -> None:
        for name, value in (
            ("update_norm_bound", update_norm_bound),
            ("max_update_norm", max_update_norm),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        super().__init__(**kwargs)
        self.update_norm_bound = update_norm_bound
        #: > 0: a train reply whose update is longer is rejected (see check_update_norm).
        self.max_update_norm = max_update_norm
        self._sent: dict[str, np.ndarray] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # kept every round (the adapter is small): the round's update norms are reported
        self._sent = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def update_norms(self, replies: Iterable[Message]) -> list[float]:
        """Each train reply's update norm against the adapter sent this round.

        Replies whose tensors are not the sent ones' shapes (a flexlora site's own rank)
        have no update in that space and are left out.
        """
        sent = self._sent or {}
        norms = []
        for msg in replies:
            reply = {k: a.numpy() for k, a in msg.content[self.arrayrecord_key].items()}
            if reply.keys() == sent.keys() and all(reply[k].shape == sent[k].shape for k in sent):
                norms.append(update_norm(reply, sent))
        return norms

    def _sent_arrays(self) -> dict[str, np.ndarray]:
        if self._sent is None:
            raise RuntimeError("norm bounding needs the arrays sent: call configure_train")
        return self._sent

    def check_update_norm(self, msg: Message) -> None:
        """Raise ``ValueError`` if the reply's update is longer than ``max_update_norm``.

        For a reply that passed validation (its tensors are the adapter's, finite): the
        caller leaves a failing one out of the round, as it does an invalid one.
        """
        if not self.max_update_norm:
            return
        record = msg.content[self.arrayrecord_key]
        norm = update_norm({k: a.numpy() for k, a in record.items()}, self._sent_arrays())
        if norm > self.max_update_norm:
            raise ValueError(
                f"update norm {norm:.4g} exceeds federation.max-update-norm "
                f"{self.max_update_norm:g}: left out of the round"
            )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.update_norm_bound:
            sent = self._sent_arrays()
            for msg in replies:
                record = msg.content[self.arrayrecord_key]
                bounded, norm = bound_update(
                    {k: a.numpy() for k, a in record.items()}, sent, self.update_norm_bound
                )
                if norm > self.update_norm_bound:
                    log.info(
                        "round %d: update of site %d has norm %.4g: bounded to %.4g",
                        server_round,
                        msg.metadata.src_node_id,
                        norm,
                        self.update_norm_bound,
                    )
                    # the reply's own key order; Flower's DP wrappers replace records alike
                    msg.content[self.arrayrecord_key] = ArrayRecord(
                        {k: Array(bounded[k]) for k in record.keys()}
                    )
        return super().aggregate_train(server_round, replies)
