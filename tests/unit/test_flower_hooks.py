"""The private Flower hooks fedhaven's strategies override, pinned to Flower 1.42.

Flower offers no public hook for these three steps, so a Flower upgrade may rename one, change
its arguments or stop calling it, and the override would silently stop taking part. Each test
fails then, naming the hook: check the override against the new Flower before relaxing it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
)
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.fedopt import FedOpt
from test_fedavg import FakeGrid, reply

from fedhaven import protocol
from fedhaven.config import Config
from fedhaven.strategies import FedAdam, FedAvg, FedYogi, FlexLoRA, central_dp

pytestmark = pytest.mark.usefixtures("flower_identity")

# A federation of one site (Flower's sampling waits for min_available_nodes, 2 by default).
ONE_SITE = {"min_available_nodes": 1, "min_train_nodes": 1, "min_evaluate_nodes": 1}

# (Flower class, hook) -> the hook's parameters in Flower 1.42
PINNED: dict[tuple[type, str], list[str]] = {
    (FlowerFedAvg, "_construct_messages"): ["self", "record", "node_ids", "message_type"],
    (FedOpt, "_compute_deltat_and_mt"): ["self", "aggregated_arrayrecord"],
    (DifferentialPrivacyServerSideAdaptiveClipping, "_geometric_update"): [
        "self",
        "clipped_fraction",
    ],
    (DifferentialPrivacyClientSideAdaptiveClipping, "_geometric_update"): [
        "self",
        "clipped_fraction",
    ],
}


@pytest.mark.parametrize(("flower", "hook"), PINNED, ids=[f"{c.__name__}.{h}" for c, h in PINNED])
def test_the_hook_keeps_its_signature(flower: type, hook: str) -> None:
    where = f"Flower's {flower.__name__}.{hook} (overridden in fedhaven.strategies)"
    assert callable(getattr(flower, hook, None)), f"{where} is gone: find its replacement"
    params = list(inspect.signature(getattr(flower, hook)).parameters)
    assert params == PINNED[flower, hook], f"{where} now takes {params}: adapt the override"


class Spy:
    """Wraps a method on a class; records each call's arguments and calls through."""

    def __init__(self, owner: type, name: str) -> None:
        self.owner, self.name = owner, name
        self.calls: list[tuple[Any, ...]] = []
        self.original: Callable[..., Any] = vars(owner)[name]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Spy:
        spy = self

        def wrapper(obj: Any, *args: Any) -> Any:
            spy.calls.append(args)
            return spy.original(obj, *args)

        monkeypatch.setattr(self.owner, self.name, wrapper)
        return self

    def called(self, public: str) -> str:
        return (
            f"{public} no longer calls Flower's {self.owner.__name__}.{self.name}, which "
            "fedhaven.strategies overrides: move the override to the step that replaced it"
        )


def _owner(cls: type, hook: str) -> type:
    """The class in ``cls``'s MRO that defines ``hook`` (Flower's, not fedhaven's)."""
    return next(c for c in cls.__mro__ if hook in vars(c) and c.__module__.startswith("flwr"))


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[type, str], Spy]]:
    yield lambda owner, name: Spy(owner, name).install(monkeypatch)


def test_configure_train_and_evaluate_build_messages_in_construct_messages(spy) -> None:
    # FlexLoRA sends each node the adapter at its own LoRA rank: the messages, per node, are
    # built in this hook, inside Validated.configure_train, which measures what each node got
    ours = spy(FlexLoRA, "_construct_messages")
    flowers = spy(FlowerFedAvg, "_construct_messages")
    strategy = FlexLoRA(**ONE_SITE)
    arrays = ArrayRecord({"w": torch.zeros(2, 2)})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([3])))  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in messages] == [3]
    assert [c[2] for c in ours.calls] == [MessageType.TRAIN], ours.called("configure_train")
    list(strategy.configure_evaluate(1, arrays, ConfigRecord(), FakeGrid([3])))  # type: ignore[arg-type]
    assert [c[2] for c in flowers.calls] == [MessageType.EVALUATE], flowers.called(
        "configure_evaluate"
    )


@pytest.mark.parametrize("rule", [FedAdam, FedYogi], ids=["fedadam", "fedyogi"])
def test_the_server_step_begins_in_compute_deltat_and_mt(rule: type, spy) -> None:
    # ServerOptimizer keeps the sites' weighted mean computed there (for the head's tensors)
    hook = spy(FedOpt, "_compute_deltat_and_mt")
    strategy = rule(**ONE_SITE)
    sent = ArrayRecord({"w": torch.zeros(2, 2)})
    list(strategy.configure_train(1, sent, ConfigRecord(), FakeGrid([5])))
    arrays, _ = strategy.aggregate_train(1, [reply(5, {"w": torch.ones(2, 2)}, num_examples=3)])
    assert arrays is not None
    assert len(hook.calls) == 1, hook.called(f"{rule.__name__}.aggregate_train")


@pytest.mark.parametrize("mode", ["server-adaptive", "client-adaptive"])
def test_adaptive_clipping_steps_the_bound_in_geometric_update(mode: str, spy) -> None:
    # central_dp._Adaptive corrects the fraction Flower 1.42 steps on
    cfg = Config().replace(**{"privacy.central": mode, "federation.sites": 1})
    base = FedAvg(**ONE_SITE, weighted_by_key=protocol.SITE_WEIGHT)
    strategy, _ = central_dp.wrap(base, cfg)
    hook = spy(_owner(type(strategy), "_geometric_update"), "_geometric_update")
    sent = ArrayRecord({"w": torch.zeros(2, 2)})
    list(strategy.configure_train(1, sent, ConfigRecord(), FakeGrid([9])))  # type: ignore[arg-type]
    content = reply(9, {"w": torch.ones(2, 2)}, num_examples=3, site_weight=1)
    if mode == "client-adaptive":
        content.content[protocol.METRICS][protocol.NORM_BIT] = 1
    arrays, _ = strategy.aggregate_train(1, [content])
    assert arrays is not None
    assert len(hook.calls) == 1, hook.called(f"{hook.owner.__name__}.aggregate_train")
