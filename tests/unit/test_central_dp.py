"""Central DP: Flower's clipping wrappers around our FedAvg, accounted by Flower's accountant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from opacus.accountants import RDPAccountant
from test_fedavg import FakeGrid, error_reply, reply

from fedhaven import protocol
from fedhaven.config import Config
from fedhaven.errors import FedhavenError
from fedhaven.server.app import build_strategy
from fedhaven.strategies import FedAvg, central_dp

pytestmark = pytest.mark.usefixtures("flower_identity")

ZERO = torch.zeros(2, 2)
BIG = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # norm 5: clipped to norm 1
SMALL = torch.tensor([[0.0, 0.3], [0.4, 0.0]])  # norm 0.5: within the bound


def _wrap(mode: str, noise: float = 1e-6, clip: float = 1.0):
    cfg = Config().replace(
        **{
            "privacy.central": mode,
            "privacy.central-noise": noise,
            "privacy.central-clip": clip,
            "federation.sites": 2,
        }
    )
    base = build_strategy(cfg)
    strategy, accountant = central_dp.wrap(base, cfg)
    return strategy, accountant, base


def _round(strategy, server_round: int, replies: list[Message]) -> np.ndarray | None:
    list(
        strategy.configure_train(
            server_round, ArrayRecord({"w": ZERO}), ConfigRecord(), FakeGrid([11, 22])
        )
    )
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return None if arrays is None else protocol.from_record(arrays)["w"].numpy()


def _replies(weights: tuple[float, float] = (1.0, 1.0)) -> list[Message]:
    # very different example counts: under central DP they must not matter
    return [
        reply(11, {"w": BIG}, num_examples=10, site_weight=weights[0]),
        reply(22, {"w": SMALL}, num_examples=1000, site_weight=weights[1]),
    ]


def test_off_keeps_fedavg_weighted_by_examples() -> None:
    strategy, accountant, base = _wrap("off")
    assert strategy is base and accountant is None
    assert base.weighted_by_key == protocol.NUM_EXAMPLES


@pytest.mark.parametrize(
    ("mode", "flower"),
    [
        ("server-fixed", DifferentialPrivacyServerSideFixedClipping),
        ("client-fixed", DifferentialPrivacyClientSideFixedClipping),
        ("server-adaptive", DifferentialPrivacyServerSideAdaptiveClipping),
        ("client-adaptive", DifferentialPrivacyClientSideAdaptiveClipping),
    ],
)
def test_each_mode_is_flowers_wrapper_around_a_uniform_fedavg(mode: str, flower: type) -> None:
    strategy, accountant, base = _wrap(mode)
    assert isinstance(strategy, flower) and strategy.strategy is base
    assert isinstance(base, FedAvg) and base.weighted_by_key == protocol.SITE_WEIGHT
    assert accountant is not None and accountant.num_releases == 0


def test_server_side_clipping_bounds_each_update_and_averages_sites_equally() -> None:
    strategy, accountant, _ = _wrap("server-fixed")
    w = _round(strategy, 1, _replies())
    clipped = BIG.numpy() / 5.0  # norm 5 -> 1
    np.testing.assert_allclose(w, (clipped + SMALL.numpy()) / 2, atol=1e-4)
    assert accountant.num_releases == 1


def test_epsilon_grows_per_release_and_matches_an_independent_accountant() -> None:
    strategy, accountant, _ = _wrap("server-fixed", noise=1.0)
    eps = []
    for server_round in (1, 2, 3):
        assert _round(strategy, server_round, _replies()) is not None
        eps.append(accountant.get_epsilon(1e-5))
    assert eps[0] < eps[1] < eps[2]
    opacus = RDPAccountant()
    opacus.history = [(1.0, 1.0, 3)]  # every site in every round: sample rate 1
    assert eps[2] == pytest.approx(opacus.get_epsilon(delta=1e-5), rel=1e-6)


@pytest.mark.parametrize("failure", ["a-site-failed", "site-weight-not-one"])
@pytest.mark.parametrize("mode", ["server-fixed", "server-adaptive"])
def test_a_round_without_every_sites_update_is_neither_released_nor_accounted(
    mode: str, failure: str
) -> None:
    if failure == "a-site-failed":
        replies = [reply(11, {"w": BIG}, num_examples=10, site_weight=1.0), error_reply(22)]
    else:  # a site claiming more weight than one site's
        replies = _replies(weights=(1.0, 5.0))
    strategy, accountant, _ = _wrap(mode, noise=1.0)
    assert _round(strategy, 1, replies) is None
    assert accountant.num_releases == 0


def test_client_side_modes_send_the_bound_and_only_adaptive_asks_for_the_norm_bit() -> None:
    for mode, adaptive in (("client-fixed", False), ("client-adaptive", True)):
        strategy, _, _ = _wrap(mode, clip=0.7)
        msgs = list(
            strategy.configure_train(1, ArrayRecord({"w": ZERO}), ConfigRecord(), FakeGrid([1, 2]))
        )
        config = msgs[0].content[protocol.CONFIG]
        assert config[protocol.CLIPPING_NORM] == 0.7
        assert bool(config.get(protocol.ADAPTIVE_CLIPPING)) is adaptive


@pytest.mark.parametrize(("clip", "moves"), [(0.1, "up"), (100.0, "down")])
def test_adaptive_clipping_moves_the_bound_toward_the_updates(clip: float, moves: str) -> None:
    # Andrew et al.: a bound that clips every update grows, one that clips none shrinks
    strategy, accountant, _ = _wrap("server-adaptive", clip=clip)
    _round(strategy, 1, _replies())  # update norms 5 and 0.5
    expected = clip * np.exp(0.2 * 0.5) if moves == "up" else clip * np.exp(-0.2 * 0.5)
    # the count of clipped updates is noisy too (σ = sites / 20): ±1% on the step
    assert strategy.clipping_norm == pytest.approx(expected, rel=0.05)
    assert accountant.num_releases == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [("privacy.central", "secure"), ("privacy.central-noise", 0), ("privacy.central-clip", -1)],
)
def test_bad_central_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(FedhavenError, match=f"config '{key}'"):
        Config().replace(**{key: value})
