"""Secure aggregation: each training round's exchange runs as Flower's SecAgg+
(``SecAggPlusWorkflow`` at the coordinator, ``secaggplus_mod`` at each site), so the
coordinator learns the sites' weighted mean and never one site's tensors.

Flower 1.42 ships SecAgg+ for its legacy API only: the workflow takes a ``LegacyContext``
whose legacy strategy gives it the ``fit`` instructions (``configure_fit``) and receives the
unmasked aggregate (``aggregate_fit``). Our rules are Message-API strategies, and their round
loop (``Strategy.start``) sends a round's train messages with ``grid.send_and_receive``.
:class:`SecureAggregationGrid` is that grid, wrapped: it hands a round's train messages to
Flower's workflow through :class:`_FitPhase`, a legacy strategy that only carries them, and
answers with one reply per site whose update went into the sum. Each such reply carries the
round's aggregate, not the site's tensors — Flower's workflow itself does the same for its
legacy strategies ("backward compatibility") — and the site's metrics, which SecAgg+ sends in
the clear. The rule's weighted mean of identical arrays is the aggregate, so FedAvg, FFA,
FedProx, FedAdam/FedYogi (their step starts from that mean) and central DP with clipping at
the sites run unchanged. Evaluation, checkpoints and the report are untouched.

SecAgg+'s mean: site k sends ``q(w_k·x_k)``, ``w_k = weight_k / max_weight`` rounded to
1/2^22, ``q`` stochastic rounding to 2^22 levels over [−clip, clip], masked mod 2^32; the
coordinator unmasks the sum and divides by the sum of the ``w_k``. Its error per coordinate
is below ``n·(2·clip/2^22) / Σw_k`` (one level per site) plus the weights' rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.serde import recorddict_to_proto
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedhaven import protocol

log = logging.getLogger(__name__)

# Each site's private key is shared with every other site of the round and rebuilt from
# half the shares: a round survives up to half its sites dropping out after sending keys,
# and no fewer than half the sites (or the coordinator with them) can unmask one site.
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 0.5


class _FitPhase(LegacyStrategy):
    """The legacy strategy SecAgg+ drives for one round: the fit instructions are the
    Message-API train messages given; the aggregate comes back as one reply per site."""

    def __init__(self, messages: list[Message], weight_key: str, grid: Grid) -> None:
        super().__init__()
        self.messages = {m.metadata.dst_node_id: m for m in messages}
        self.weight_key, self.grid = weight_key, grid
        self.replies: list[Message] = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: object
    ) -> list[tuple[ClientProxy, FitIns]]:
        run_id = self.grid.run.run_id
        return [
            (
                GridClientProxy(node, self.grid, run_id),
                protocol.legacy_fit_ins(m.content, self.weight_key),
            )
            for node, m in self.messages.items()
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # Flower set every result's parameters to the unmasked aggregate
        for proxy, res in results:
            sent = self.messages[proxy.node_id]
            aggregate = parameters_to_ndarrays(res.parameters)
            content = protocol.from_legacy_aggregate(
                aggregate,
                sent.content[protocol.ARRAYS],
                res.metrics,  # type: ignore[arg-type]
            )
            self.replies.append(Message(content, reply_to=sent))
        return None, {}  # the Message-API rule aggregates the replies; nothing to keep here

    def initialize_parameters(self, client_manager: object) -> None:
        return None

    def configure_evaluate(self, *args: object) -> list:  # type: ignore[override]
        return []

    def aggregate_evaluate(self, *args: object) -> tuple[None, dict]:  # type: ignore[override]
        return None, {}

    def evaluate(self, *args: object) -> None:  # type: ignore[override]
        return None


def content_nbytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it (protobuf)."""
    return recorddict_to_proto(content).ByteSize()


class SecureAggregationGrid(Grid):
    """``grid`` with every training round run as SecAgg+ (see the module's docstring).

    ``weight_key``: the metric that weighs each site's update (the rule's
    ``weighted_by_key``); ``max_weight``, ``clip``: SecAgg+'s quantisation (the config's
    ``federation.secagg-max-weight``, ``federation.secagg-clip``); ``timeout``: how long each
    of its four stages waits for the sites. ``traffic[round]`` counts the bytes of every
    SecAgg+ message of a round (serialised content), to the sites and back.
    """

    def __init__(
        self, grid: Grid, *, weight_key: str, max_weight: float, clip: float, timeout: float
    ) -> None:
        self.grid, self.weight_key = grid, weight_key
        self.workflow = SecAggPlusWorkflow(
            NUM_SHARES,
            RECONSTRUCTION_THRESHOLD,
            max_weight=max_weight,
            clipping_range=clip,
            timeout=timeout,
        )
        self.traffic: dict[int, dict[str, int]] = {}

    # -- the Grid interface: the wrapped grid's -------------------------------------------
    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        self.grid.set_run(run_id)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        if not train:
            return self.grid.send_and_receive(messages, timeout=timeout)
        if any(protocol.SECAGG in m.content.config_records for m in train):
            return self._stage(messages, timeout)  # one of the workflow's own stages
        if len(train) != len(messages):
            raise ValueError("a round's train messages come alone")
        return self._secure_round(train)

    def _stage(self, messages: list[Message], timeout: float | None) -> list[Message]:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        count = self.traffic.setdefault(
            int(messages[0].metadata.group_id), {"bytes_sent": 0, "bytes_received": 0}
        )
        count["bytes_sent"] += sum(content_nbytes(m.content) for m in messages)
        count["bytes_received"] += sum(
            content_nbytes(m.content) for m in replies if not m.has_error()
        )
        return replies

    def _secure_round(self, messages: list[Message]) -> list[Message]:
        server_round = int(messages[0].content[protocol.CONFIG][protocol.SERVER_ROUND])
        phase = _FitPhase(messages, self.weight_key, self)
        context = LegacyContext(
            Context(self.run.run_id, 0, {}, RecordDict(), {}),
            strategy=phase,
            client_manager=SimpleClientManager(),
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        # The workflow reads the global parameters only to hand them to configure_fit,
        # which takes each site's own instruction instead.
        context.state.array_records[MAIN_PARAMS_RECORD] = messages[0].content[protocol.ARRAYS]
        self.workflow(self, context)
        if len(phase.replies) < len(messages):
            log.warning(
                "round %d: secure aggregation summed %d of %d sites' updates",
                server_round,
                len(phase.replies),
                len(messages),
            )
        return phase.replies
