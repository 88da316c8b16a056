"""The named rules (federation.strategy): each is Flower's strategy plus fedhaven's validation
and bookkeeping; robust rules withstand a hostile site; the server optimizers step the right
way; bad settings are user errors naming the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import strategy as flower
from test_fedavg import FakeGrid, reply

from fedhaven import config as fconfig
from fedhaven import protocol
from fedhaven.config import Config
from fedhaven.errors import FedhavenError
from fedhaven.server.app import build_strategy
from fedhaven.strategies import STRATEGIES, FedAdam, FedYogi, Validated, central_dp
from fedhaven.strategies.norm_bound import bound_update

pytestmark = pytest.mark.usefixtures("flower_identity")

FLOWER = {
    "fedavg": flower.FedAvgM,  # Flower's FedAvg when federation.server-momentum is 0
    "ffa": flower.FedAvg,  # FFA-LoRA: FedAvg of B, with A frozen at the sites
    "fedprox": flower.FedProx,
    "fedadam": flower.FedAdam,
    "fedyogi": flower.FedYogi,
    "fedmedian": flower.FedMedian,
    "trimmedavg": flower.FedTrimmedAvg,
    "krum": flower.Krum,
    "flexlora": flower.FedAvg,  # the mean of B·A: tests/unit/test_flexlora.py
}


def _cfg(strategy: str = "fedavg", sites: int = 6, **flat: object) -> Config:
    return Config().replace(**{"federation.strategy": strategy, "federation.sites": sites, **flat})


def _configure(strategy: Validated, sent: dict[str, np.ndarray], nodes: list[int]) -> list[Message]:
    record = ArrayRecord({k: torch.from_numpy(v) for k, v in sent.items()})
    return list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid(nodes)))


def _site(node: int, arrays: dict[str, np.ndarray], examples: int = 10) -> Message:
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()
    }
    return reply(node, tensors, num_examples=examples, train_loss=0.5)


def _aggregate(strategy: Validated, server_round: int, replies: list[Message]):
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None
    return {k: a.numpy() for k, a in arrays.items()}


def test_every_config_name_has_a_rule() -> None:
    assert set(STRATEGIES) == set(fconfig.STRATEGIES) == set(FLOWER)


# flexlora refuses norm bounds (tests/unit/test_flexlora.py)
@pytest.mark.parametrize("name", [n for n in FLOWER if n != "flexlora"])
def test_build_strategy_builds_flowers_rule_with_the_mixin(name: str) -> None:
    cfg = _cfg(
        name,
        **{
            "federation.proximal-mu": 0.05,
            "federation.server-learning-rate": 0.02,
            "federation.server-momentum": 0.7,
            "federation.trim-beta": 0.3,
            "federation.krum-byzantine": 2,
            "federation.update-norm-bound": 2.5,
            "federation.min-sites": 3,
        },
    )
    strategy = build_strategy(cfg)
    assert isinstance(strategy, FLOWER[name]) and isinstance(strategy, Validated)
    assert type(strategy) is STRATEGIES[name]
    assert strategy.update_norm_bound == 2.5
    assert strategy.weighted_by_key == protocol.NUM_EXAMPLES
    assert strategy.min_train_nodes == strategy.min_available_nodes == 3
    assert strategy.arrayrecord_key == protocol.ARRAYS
    knob = {
        "fedavg": ("server_momentum", 0.7),
        "fedprox": ("proximal_mu", 0.05),
        "fedadam": ("eta", 0.02),
        "fedyogi": ("eta", 0.02),
        "trimmedavg": ("beta", 0.3),
        "krum": ("num_malicious_nodes", 2),
    }.get(name)
    if knob:
        assert getattr(strategy, knob[0]) == knob[1]


@pytest.mark.parametrize("name", list(FLOWER))
def test_every_rule_drops_a_malformed_reply_and_keeps_round_stats(name: str) -> None:
    strategy = build_strategy(_cfg(name, sites=4))
    sent = {"w": np.zeros((2, 2), np.float32)}
    _configure(strategy, sent, [1, 2, 3, 4])
    good = [_site(n, {"w": np.full((2, 2), 0.1 * n)}) for n in (1, 2, 3)]
    bad = reply(4, {"w": torch.ones(3, 2)}, num_examples=10, train_loss=0.5)  # wrong shape
    new = _aggregate(strategy, 1, [good[0], bad, *good[1:]])
    assert new["w"].shape == (2, 2) and np.isfinite(new["w"]).all()
    one = protocol.record_nbytes(ArrayRecord({"w": torch.zeros(2, 2)}))
    assert strategy.round_stats[1] == {
        "bytes_sent": 4 * one,
        "bytes_received": 3 * one,
        "sites_used": 3,
        "rejected": 1,
        # the accepted updates 0.1·n·ones(2, 2): L2 norms 0.2, 0.4, 0.6
        "update_norm_median": pytest.approx(0.4),
        "update_norm_max": pytest.approx(0.6),
    }
    assert set(strategy.site_metrics[1]) == {1, 2, 3}


# --- robustness: five honest sites, one sending its update ×100 --------------------------

RNG = np.random.default_rng(0)
SENT = {"a": RNG.normal(size=(4, 4)).astype(np.float32), "b": RNG.normal(size=3).astype(np.float32)}
DIRECTION = {k: RNG.uniform(0.5, 1.5, size=v.shape).astype(np.float32) for k, v in SENT.items()}
HONEST = [  # small updates close to each other: 0.1 × direction, ±0.005 per coordinate
    {k: 0.1 * d + RNG.uniform(-0.005, 0.005, size=d.shape) for k, d in DIRECTION.items()}
    for _ in range(5)
]
HOSTILE = {k: 100 * v for k, v in HONEST[0].items()}
CLEAN = {k: SENT[k] + np.mean([u[k] for u in HONEST], axis=0) for k in SENT}  # by hand
CLEAN_NORM = max(np.sqrt(sum(float((u[k] ** 2).sum()) for k in u)) for u in HONEST)


def _attacked_round(strategy: Validated) -> dict[str, np.ndarray]:
    _configure(strategy, SENT, list(range(1, 7)))
    updates = [*HONEST, HOSTILE]
    replies = [_site(i + 1, {k: SENT[k] + u[k] for k in SENT}) for i, u in enumerate(updates)]
    return _aggregate(strategy, 1, replies)


def _distance(arrays: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(arrays[k] - CLEAN[k]).max()) for k in CLEAN)


@pytest.mark.parametrize(
    ("name", "flat"),
    [
        ("fedmedian", {}),
        ("trimmedavg", {}),  # β = 0.2 of 6 sites: one cut at each end
        ("krum", {}),  # f = 1
        ("fedavg", {"federation.update-norm-bound": 1.2 * CLEAN_NORM}),
    ],
    ids=["fedmedian", "trimmedavg", "krum", "fedavg+norm-bound"],
)
def test_robust_rules_stay_near_the_clean_aggregate(name: str, flat: dict[str, float]) -> None:
    # the honest updates differ by at most 0.01 per coordinate; the hostile one by ~10
    assert _distance(_attacked_round(build_strategy(_cfg(name, **flat)))) < 0.02


def test_plain_fedavg_is_dragged_far_off_by_the_hostile_site() -> None:
    assert _distance(_attacked_round(build_strategy(_cfg("fedavg")))) > 1.0


def test_bound_update_clips_only_long_updates_and_keeps_their_direction() -> None:
    sent = {"w": np.array([1.0, 1.0], np.float32)}
    short, norm = bound_update({"w": np.array([1.3, 1.4], np.float32)}, sent, bound=1.0)
    np.testing.assert_allclose(short["w"], [1.3, 1.4], rtol=1e-6)
    assert norm == pytest.approx(0.5)
    long, norm = bound_update({"w": np.array([4.0, 5.0], np.float32)}, sent, bound=1.0)
    np.testing.assert_allclose(long["w"], [1.6, 1.8], rtol=1e-6)  # (3, 4) / 5
    assert norm == pytest.approx(5.0) and long["w"].dtype == np.float32
    same, norm = bound_update(sent, sent, bound=1.0)  # a zero update stays zero
    np.testing.assert_array_equal(same["w"], sent["w"])
    assert norm == 0.0


def test_norm_bound_needs_the_arrays_sent() -> None:
    strategy = build_strategy(_cfg("fedavg", **{"federation.update-norm-bound": 1.0}))
    with pytest.raises(RuntimeError, match="configure_train"):
        strategy.aggregate_train(1, [_site(1, {"w": np.ones(2)})])


# --- server optimizers -----------------------------------------------------------------


#: A LoRA factor's key (the server step moves it) and a head's (trained in full: the mean).
LORA_KEY, HEAD_KEY = "encoder.layer.0.query.lora_B.weight", "classifier.weight"


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimizer_steps_lora_toward_the_mean_update(name: str) -> None:
    eta = 0.01
    strategy = build_strategy(_cfg(name, sites=2, **{"federation.server-learning-rate": eta}))
    w = np.array([[1.0, -1.0], [0.5, 0.0]], np.float32)
    sent = {LORA_KEY: w, HEAD_KEY: w}
    _configure(strategy, sent, [1, 2])
    deltas = [np.array([[0.4, -0.2], [0.0, 0.3]]), np.array([[0.2, -0.4], [-0.2, 0.1]])]
    replies = [
        _site(1, {k: w + deltas[0] for k in sent}, examples=10),
        _site(2, {k: w + deltas[1] for k in sent}, examples=30),
    ]
    new = _aggregate(strategy, 1, replies)
    mean = (10 * deltas[0] + 30 * deltas[1]) / 40  # [[0.25, -0.35], [-0.15, 0.15]]
    assert {a.dtype for a in new.values()} == {np.dtype(np.float32)}  # not float64: 2× bytes
    step = new[LORA_KEY] - w
    np.testing.assert_array_equal(np.sign(step), np.sign(mean))
    # an adaptive step: about η per coordinate, whatever the update's size (not the average)
    assert np.all(np.abs(step) <= eta * 1.0001) and np.all(np.abs(step) > eta / 10)
    # the head is trained in full at a learning rate of its own: it takes the sites' mean
    np.testing.assert_allclose(new[HEAD_KEY], w + mean, rtol=1e-6)


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_server_optimizer_state_round_trips(cls: type[FedAdam] | type[FedYogi]) -> None:
    def round_of(strategy: Validated, server_round: int, sent: dict[str, np.ndarray]):
        record = ArrayRecord({k: torch.from_numpy(v) for k, v in sent.items()})
        list(strategy.configure_train(server_round, record, ConfigRecord(), FakeGrid([1, 2])))
        replies = [
            _site(1, {LORA_KEY: sent[LORA_KEY] + 0.3}),
            _site(2, {LORA_KEY: sent[LORA_KEY] - 0.1}),
        ]
        return _aggregate(strategy, server_round, replies)

    first = cls(min_train_nodes=2, min_available_nodes=2)
    assert first.state_dict() == {"m_t": None, "v_t": None}
    after_1 = round_of(first, 1, {LORA_KEY: np.zeros(3, np.float32)})
    state = first.state_dict()
    assert set(state) == {"m_t", "v_t"} and state["m_t"] is not None
    resumed = cls(min_train_nodes=2, min_available_nodes=2)
    resumed.load_state_dict(state)
    state["m_t"][LORA_KEY][:] = 99.0  # type: ignore[index]  # the strategy keeps its own copy
    second = round_of(first, 2, after_1)[LORA_KEY]
    np.testing.assert_array_equal(round_of(resumed, 2, after_1)[LORA_KEY], second)
    # without the moments, round 2 would have gone elsewhere
    fresh = round_of(cls(min_train_nodes=2, min_available_nodes=2), 2, after_1)[LORA_KEY]
    assert not np.allclose(fresh, second)


# --- FedAvg's server momentum ----------------------------------------------------------


def _momentum_round(strategy: Validated, server_round: int, sent: np.ndarray, moves: list[float]):
    """One round of two equal sites that move every weight by ``moves``; the new weights."""
    _configure(strategy, {LORA_KEY: sent}, [1, 2])
    replies = [_site(n, {LORA_KEY: sent + move}) for n, move in zip((1, 2), moves, strict=True)]
    return _aggregate(strategy, server_round, replies)[LORA_KEY]


def _momentum_cfg(beta: float, **flat: object) -> Config:
    return _cfg("fedavg", sites=2, **{"federation.server-momentum": beta, **flat})


def test_fedavg_momentum_adds_beta_times_the_last_move() -> None:
    beta = 0.5
    strategy = build_strategy(_momentum_cfg(beta, **{"train.schedule": "constant"}))
    w0 = np.zeros(3, np.float32)
    w1 = _momentum_round(strategy, 1, w0, [0.2, 0.4])  # mean move 0.3; no earlier move
    np.testing.assert_allclose(w1, w0 + 0.3, rtol=1e-6)
    w2 = _momentum_round(strategy, 2, w1, [0.0, 0.2])  # mean move 0.1, plus β · 0.3
    np.testing.assert_allclose(w2, w1 + 0.1 + beta * 0.3, rtol=1e-6)
    assert w2.dtype == np.float32  # not float64: 2× bytes to every site
    plain = build_strategy(_momentum_cfg(0.0))
    _momentum_round(plain, 1, w0, [0.2, 0.4])
    np.testing.assert_allclose(_momentum_round(plain, 2, w1, [0.0, 0.2]), w1 + 0.1, rtol=1e-6)


def test_fedavg_momentum_follows_the_sites_learning_rate_schedule() -> None:
    # 4 rounds of linear decay: the sites' rates are 1, 3/4, 1/2 and 1/4 of the configured
    # one, so round t's β is 0.5 · (rate t / rate t-1): 0.375 in round 2, 1/3 in round 3
    strategy = build_strategy(_momentum_cfg(0.5, **{"federation.rounds": 4}))
    w1 = _momentum_round(strategy, 1, np.zeros(3, np.float32), [0.2, 0.4])  # moves 0.3
    w2 = _momentum_round(strategy, 2, w1, [0.0, 0.2])
    np.testing.assert_allclose(w2 - w1, 0.1 + 0.375 * 0.3, rtol=1e-5)
    w3 = _momentum_round(strategy, 3, w2, [0.1, 0.1])
    np.testing.assert_allclose(w3 - w2, 0.1 + (0.1 + 0.375 * 0.3) / 3, rtol=1e-5)


def test_fedavg_momentum_round_trips_through_its_state() -> None:
    def strategy() -> Validated:
        return build_strategy(_momentum_cfg(0.5))

    first = strategy()
    assert first.state_dict() == {"momentum": None}
    w1 = _momentum_round(first, 1, np.zeros(3, np.float32), [0.2, 0.4])
    state = first.state_dict()
    resumed = strategy()
    resumed.load_state_dict(state)
    state["momentum"][0][:] = 99.0  # the strategy keeps its own copy
    second = _momentum_round(first, 2, w1, [0.0, 0.2])
    np.testing.assert_array_equal(_momentum_round(resumed, 2, w1, [0.0, 0.2]), second)
    # without the momentum, round 2 would have gone elsewhere
    assert not np.allclose(_momentum_round(strategy(), 2, w1, [0.0, 0.2]), second)


def test_central_dp_with_server_momentum_is_refused() -> None:
    with pytest.raises(FedhavenError, match=r"'federation\.server-momentum'.*privacy\.central"):
        _cfg("fedavg", **{"privacy.central": "server-fixed", "federation.server-momentum": 0.5})


# --- FedProx ----------------------------------------------------------------------------


def test_fedprox_sends_mu_under_the_key_the_sites_read() -> None:
    strategy = build_strategy(_cfg("fedprox", sites=2, **{"federation.proximal-mu": 0.05}))
    msgs = _configure(strategy, {"w": np.zeros(2, np.float32)}, [1, 2])
    assert all(m.content[protocol.CONFIG][protocol.PROXIMAL_MU] == 0.05 for m in msgs)


def test_fedprox_works_under_central_dp() -> None:
    # its aggregate is the plain average, which central DP's sensitivity bound assumes
    cfg = _cfg("fedprox", sites=2, **{"privacy.central": "client-fixed"})
    strategy, accountant = central_dp.wrap(build_strategy(cfg), cfg)
    assert accountant is not None
    record = ArrayRecord({"w": torch.zeros(2)})
    msgs = list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid([1, 2])))
    config = msgs[0].content[protocol.CONFIG]
    assert config[protocol.PROXIMAL_MU] == cfg.federation.proximal_mu
    assert protocol.CLIPPING_NORM in config


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("federation.strategy", "fedsgd"),
        ("federation.proximal-mu", -0.1),
        ("federation.server-learning-rate", 0.0),
        ("federation.server-momentum", -0.1),
        ("federation.server-momentum", 1.0),
        ("federation.trim-beta", 0.5),
        ("federation.trim-beta", -0.1),
        ("federation.krum-byzantine", -1),
        ("federation.update-norm-bound", -1.0),
    ],
)
def test_bad_strategy_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(FedhavenError, match=f"config '{key}'"):
        Config().replace(**{key: value})


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedmedian", "trimmedavg", "krum"])
def test_central_dp_with_another_rule_names_both_keys(name: str) -> None:
    with pytest.raises(FedhavenError, match=r"'federation\.strategy'.*privacy\.central") as e:
        _cfg(name, **{"privacy.central": "server-fixed"})
    assert "\n" not in str(e.value)


def test_central_dp_with_norm_bounding_is_refused() -> None:
    with pytest.raises(FedhavenError, match=r"'federation\.update-norm-bound'.*privacy\.central"):
        _cfg("fedavg", **{"privacy.central": "server-fixed", "federation.update-norm-bound": 1.0})
