"""FlexLoRA (Bai et al., 2024): sites train LoRA at ranks of their own (node config
``lora-rank``, at most ``lora.r``); the coordinator averages in the product space and gives
each site a truncated SVD of the result at that site's rank.

Per LoRA layer the aggregate is the weighted mean of the sites' products, Σᵢ wᵢ·Bᵢ·Aᵢ
(FedAvg's weights: examples, normalised), factored at the global adapter's rank ``lora.r`` by
:func:`fedhaven.models.truncated_lora`; the out × in products are never formed, as the
stacked factors [w₁B₁ … wₙBₙ]·[A₁; …; Aₙ] are that sum. The other tensors (the head) are
averaged as FedAvg averages them. A site at rank rᵢ trains with α·rᵢ/r
(:func:`fedhaven.client.app.with_site_rank`), so α/r, PEFT's scale of B·A, is the run's at
every site and the unscaled products add up.

Error: none when the mean product has rank <= ``lora.r`` (equal ranks and rank-deficient
updates, say). Otherwise each layer is off by the Frobenius norm of the singular values
dropped (Eckart–Young: no rank-``lora.r`` adapter comes closer). A site at rank rᵢ < lora.r
then gets the best rank-rᵢ factorisation of the global product, off by the singular values
past rᵢ.

The coordinator learns a site's rank from the shapes of its replies. A site it has not heard
from yet (every site in round 1) gets the global rank, truncates it itself
(:func:`fedhaven.models.refactor_lora`, the same SVD) and answers at its own rank. The ranks
learned are not checkpointed: Flower numbers the sites anew when a run restarts. Norm bounds
and central DP are refused by the config (each site's tensors differ; the rule is no plain
mean).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedhaven import protocol
from fedhaven.models import at_rank, lora_pairs, lora_rank, refactor_lora, truncated_lora
from fedhaven.strategies.fedavg import FedAvg


class FlexLoRA(FedAvg):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: node id -> the LoRA rank of its last accepted update
        self.ranks: dict[int, int] = {}
        self._global: dict[str, tuple[int, ...]] = {}  # shapes of the global adapter sent

    def _construct_messages(
        self, record: RecordDict, node_ids: list[int], message_type: str
    ) -> Iterable[Message]:
        # Private hook: Flower 1.42 has no public per-node message step, and overriding
        # configure_train would bypass Validated's per-node shapes (test_flower_hooks.py).
        # Where Flower's FedAvg builds each node's message: training gets the node's rank.
        # Evaluation sends the global adapter; a site at another rank truncates it.
        if message_type != MessageType.TRAIN:
            return super()._construct_messages(record, node_ids, message_type)
        arrays = record[self.arrayrecord_key]
        self._global = protocol.shapes(arrays)
        global_ranks = {self._global[a][0] for a in lora_pairs(self._global)}
        by_rank: dict[int, RecordDict] = {}
        messages = []
        for node in node_ids:
            rank = self.ranks.get(node)
            content = record
            if rank is not None and global_ranks != {rank}:
                if rank not in by_rank:
                    state = refactor_lora(protocol.from_record(arrays), rank)
                    by_rank[rank] = RecordDict(
                        {
                            self.arrayrecord_key: protocol.to_record(state),
                            self.configrecord_key: record[self.configrecord_key],
                        }
                    )
                content = by_rank[rank]
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node))
        return messages

    def expected_shapes(self, msg: Message) -> dict[str, tuple[int, ...]] | None:
        """What the node was sent. A node whose rank is not known yet was sent the global
        rank and may answer at its own, up to that: one rank in every LoRA pair."""
        expected = super().expected_shapes(msg)
        arrays = msg.content.get(self.arrayrecord_key)
        if expected is None or msg.metadata.src_node_id in self.ranks:
            return expected
        rank = lora_rank(protocol.shapes(arrays)) if isinstance(arrays, ArrayRecord) else None
        sent = lora_rank(expected)
        if rank is None or sent is None or not 1 <= rank <= sent:
            return expected  # the shape check says what is wrong
        return at_rank(expected, rank)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.screen_train(server_round, list(replies))
        if not accepted:
            return None, None
        if not self._global:
            raise RuntimeError("flexlora needs the global adapter's shapes: call configure_train")
        contents = [m.content for m in accepted]
        states = [protocol.from_record(c[self.arrayrecord_key]) for c in contents]
        pairs = lora_pairs(self._global)
        weights = torch.tensor(
            [float(c[protocol.METRICS][self.weighted_by_key]) for c in contents],
            dtype=torch.float64,
        )
        weights /= weights.sum()
        mean: dict[str, torch.Tensor] = {}
        for a_name, b_name in pairs.items():
            # Σᵢ wᵢ·Bᵢ·Aᵢ = [w₁B₁ … wₙBₙ]·[A₁; …; Aₙ], factored at the global rank
            b = torch.cat([w * s[b_name].double() for w, s in zip(weights, states, strict=True)], 1)
            a = torch.cat([s[a_name].double() for s in states])
            mean[b_name], mean[a_name] = truncated_lora(b, a, self._global[a_name][0])
        for msg in accepted:  # the rank each of these sites gets from now on
            rank = lora_rank(protocol.shapes(msg.content[self.arrayrecord_key]))
            if rank is not None:
                self.ranks[msg.metadata.src_node_id] = rank
        rest = [k for k in self._global if k not in mean]
        if rest:  # the head and any other tensor: FedAvg's weighted mean
            only_rest = [
                RecordDict(
                    {
                        self.arrayrecord_key: ArrayRecord(
                            {k: c[self.arrayrecord_key][k] for k in rest}
                        ),
                        protocol.METRICS: c[protocol.METRICS],
                    }
                )
                for c in contents
            ]
            head = aggregate_arrayrecords(only_rest, self.weighted_by_key)
            mean |= {k: torch.from_numpy(head[k].numpy().copy()) for k in rest}
        dtypes = {k: v.dtype for k, v in states[0].items()}
        arrays = protocol.to_record({k: mean[k].to(dtypes[k]) for k in self._global})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
