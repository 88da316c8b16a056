"""Reply validation at the coordinator, ``federation.max-update-norm`` included: each bad reply
is left out of the round with its own reason (log and audit log), and the round goes on
with the rest, under every rule and under central DP."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from test_fedavg import FakeGrid, instruction, reply

from fedhaven import auditlog, protocol
from fedhaven.auditlog import AuditLog
from fedhaven.config import Config
from fedhaven.errors import FedhavenError
from fedhaven.server.app import build_strategy
from fedhaven.strategies import STRATEGIES, FedAvg, Validated, central_dp
from fedhaven.strategies.norm_bound import bound_update, update_norm

pytestmark = pytest.mark.usefixtures("flower_identity")

SENT = torch.zeros(2, 2)
G1 = torch.tensor([[0.1, 0.2], [0.3, 0.4]])  # norm 0.55
G2 = torch.tensor([[0.5, 0.6], [0.7, 0.8]])  # norm 1.32
OVERSIZED = torch.tensor([[12.3, 0.0], [0.0, 0.0]])  # norm 12.3


def _cfg(**flat: object) -> Config:
    return Config().replace(**{"federation.sites": 6, "federation.min-sites": 1, **flat})


def _strategy(tmp_path: Path, **flat: object) -> tuple[Validated, AuditLog]:
    strategy = build_strategy(_cfg(**{"federation.max-update-norm": 5.0, **flat}))
    audit = AuditLog(tmp_path / auditlog.AUDIT_FILE)
    strategy.audit = audit
    return strategy, audit


def _configure(strategy, nodes: list[int], sent: torch.Tensor = SENT) -> None:
    list(strategy.configure_train(1, ArrayRecord({"w": sent}), ConfigRecord(), FakeGrid(nodes)))


def _rejections(audit: AuditLog) -> dict[int, str]:
    return {e["node"]: e["reason"] for e in audit.entries(auditlog.REPLY_REJECTED)}


# node -> (the reply, the reason it must be rejected for)
BAD: dict[int, tuple[Callable[[], Message], str]] = {
    3: (
        lambda: reply(3, {"w": G1 * float("nan")}, num_examples=5),
        "tensor 'w' holds non-finite values",
    ),
    4: (
        lambda: reply(4, {"w": torch.ones(3, 2)}, num_examples=5),
        r"reply tensor 'w' has shape \(3, 2\), expected \(2, 2\)",
    ),
    5: (
        lambda: reply(5, {"w": G1, "extra": torch.ones(2)}, num_examples=5),
        r"reply tensors differ from the adapter's: unexpected \['extra'\], missing \[\]",
    ),
    6: (
        lambda: reply(6, {"w": OVERSIZED}, num_examples=5),
        "update norm 12.3 exceeds federation.max-update-norm 5: left out of the round",
    ),
}


def test_each_bad_reply_is_rejected_with_its_reason_and_the_rest_is_averaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    strategy, audit = _strategy(tmp_path)
    _configure(strategy, [1, 2, *BAD])
    good = [reply(1, {"w": G1}, num_examples=1), reply(2, {"w": G2}, num_examples=3)]
    replies = [good[0], *(make() for make, _ in BAD.values()), good[1]]
    with caplog.at_level(logging.WARNING, logger="fedhaven.strategies.base"):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    # by hand: (1 × G1 + 3 × G2) / 4, the bad replies' 5 examples each nowhere
    np.testing.assert_allclose(
        protocol.from_record(arrays)["w"].numpy(), [[0.4, 0.5], [0.6, 0.7]], rtol=1e-6
    )
    rejected = _rejections(audit)
    assert set(rejected) == set(BAD)
    logged = [r.getMessage() for r in caplog.records]
    for node, (_, reason) in BAD.items():  # each its own reason, in both logs
        assert re.fullmatch(reason, rejected[node]), rejected[node]
        assert any(
            re.search(f"round 1: rejected reply of site {node}: {reason}", m) for m in logged
        )
    accepted = audit.entries(auditlog.REPLY_ACCEPTED)
    assert sorted(e["node"] for e in accepted) == [1, 2]
    assert strategy.round_stats[1]["sites_used"] == 2
    assert strategy.round_stats[1]["rejected"] == 4
    assert set(strategy.site_metrics[1]) == {1, 2}


# flexlora sends each site factors of its own rank: the config refuses norm bounds with it
@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "flexlora"])
def test_every_rule_rejects_an_oversized_update(tmp_path: Path, name: str) -> None:
    strategy, audit = _strategy(tmp_path, **{"federation.strategy": name})
    _configure(strategy, [1, 2, 3, 6])
    good = [reply(n, {"w": G1 * n}, num_examples=10, train_loss=0.5) for n in (1, 2, 3)]
    big = reply(6, {"w": OVERSIZED}, num_examples=10, train_loss=0.5)
    arrays, _ = strategy.aggregate_train(1, [*good, big])
    assert arrays is not None
    new = protocol.from_record(arrays)["w"].numpy()
    # every rule's aggregate of updates G1, 2·G1, 3·G1 stays within their span
    assert np.all(new <= 3 * G1.numpy() + 1e-6) and np.all(new >= -1e-6)
    assert _rejections(audit) == {6: BAD[6][1]}
    assert strategy.round_stats[1]["sites_used"] == 3


def test_between_the_bound_and_the_maximum_an_update_is_clipped_above_it_rejected(
    tmp_path: Path,
) -> None:
    strategy, audit = _strategy(tmp_path, **{"federation.update-norm-bound": 1.0})
    _configure(strategy, [1, 2])
    clipped = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # norm 5: clipped to 1
    rejected = torch.tensor([[3.0, 0.0], [0.0, 4.01]])  # norm sqrt(3² + 4.01²) = 5.008 > 5
    replies = [reply(1, {"w": clipped}, num_examples=1), reply(2, {"w": rejected}, num_examples=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(protocol.from_record(arrays)["w"].numpy(), clipped / 5, rtol=1e-6)
    assert _rejections(audit) == {
        2: "update norm 5.008 exceeds federation.max-update-norm 5: left out of the round"
    }


def test_the_norm_is_of_the_update_not_of_the_reply(tmp_path: Path) -> None:
    # a reply far from zero but close to what was sent is a short update: accepted
    strategy, audit = _strategy(tmp_path)
    sent = torch.full((2, 2), 100.0)
    _configure(strategy, [1], sent=sent)
    arrays, _ = strategy.aggregate_train(1, [reply(1, {"w": sent + G2}, num_examples=1)])
    assert arrays is not None and _rejections(audit) == {}


def test_update_norm_is_bound_updates_norm() -> None:
    rng = np.random.default_rng(0)
    sent = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5)}
    got = {k: v + rng.normal(size=v.shape) for k, v in sent.items()}
    by_hand = np.sqrt(sum(((got[k] - sent[k]) ** 2).sum() for k in sent))
    assert update_norm(got, sent) == pytest.approx(by_hand, rel=1e-6)
    assert update_norm(got, sent) == bound_update(got, sent, bound=1.0)[1]


def test_a_rejected_update_counts_as_missing_for_the_minimum(tmp_path: Path) -> None:
    strategy, audit = _strategy(tmp_path, **{"federation.min-sites": 2})
    strategy.stop_below_minimum = True
    _configure(strategy, [1, 6])
    replies = [reply(1, {"w": G1}, num_examples=1), BAD[6][0]()]
    with pytest.raises(FedhavenError, match="only 1 of the 2 sites required"):
        strategy.aggregate_train(1, replies)
    assert _rejections(audit) == {6: BAD[6][1]}
    (stop,) = audit.entries(auditlog.RUN_STOPPED)
    assert (stop["accepted"], stop["required"]) == (1, 2)


def test_the_check_needs_the_arrays_sent() -> None:
    strategy = FedAvg(max_update_norm=1.0)
    with pytest.raises(RuntimeError, match="configure_train"):
        strategy.aggregate_train(1, [reply(1, {"w": G1}, num_examples=1)])


# --- under central DP --------------------------------------------------------------------

CENTRAL = ["server-fixed", "client-fixed", "server-adaptive", "client-adaptive"]


def _central(tmp_path: Path, mode: str) -> tuple[object, object, Validated, AuditLog]:
    cfg = Config().replace(
        **{
            "privacy.central": mode,
            "privacy.central-noise": 1e-6,
            "privacy.central-clip": 1.0,  # below the maximum: the raw norm must be checked
            "federation.sites": 2,
            "federation.max-update-norm": 5.0,
        }
    )
    base = build_strategy(cfg)
    base.audit = AuditLog(tmp_path / auditlog.AUDIT_FILE)
    strategy, accountant = central_dp.wrap(base, cfg)
    return strategy, accountant, base, base.audit


def _central_reply(node: int, w: torch.Tensor, mode: str) -> Message:
    metrics = {protocol.NUM_EXAMPLES: 10, protocol.SITE_WEIGHT: 1.0}
    if mode == "client-adaptive":  # the site's mod reports whether it clipped
        metrics[protocol.NORM_BIT] = 0
    return Message(protocol.train_reply({"w": w}, metrics), reply_to=instruction(node))


@pytest.mark.parametrize("mode", CENTRAL)
@pytest.mark.parametrize("bad", [4, 6], ids=["wrong-shape", "oversized"])
def test_under_central_dp_a_rejected_reply_leaves_the_round_unreleased(
    tmp_path: Path, mode: str, bad: int
) -> None:
    strategy, accountant, base, audit = _central(tmp_path, mode)
    _configure(strategy, [1, bad])
    w = torch.ones(3, 2) if bad == 4 else OVERSIZED
    replies = [_central_reply(1, G1, mode), _central_reply(bad, w, mode)]
    before = strategy.clipping_norm
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert accountant.num_releases == 0
    assert strategy.clipping_norm == before  # nor does a rejected reply move the bound
    assert re.fullmatch(BAD[bad][1], _rejections(audit)[bad])
    assert base.round_stats[1]["sites_used"] == 1
    # the same round with a good reply instead is released, each reply screened once
    strategy, accountant, base, audit = _central(tmp_path / "again", mode)
    _configure(strategy, [1, 2])
    replies = [_central_reply(1, G1, mode), _central_reply(2, G2, mode)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and accountant.num_releases == 1
    assert len(audit.entries(auditlog.REPLY_ACCEPTED)) == 2
    assert _rejections(audit) == {}


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1.0, -1e-9])
def test_a_negative_max_update_norm_is_a_config_error(value: float) -> None:
    with pytest.raises(
        FedhavenError, match=r"config 'federation.max-update-norm'.*must be >= 0"
    ) as e:
        Config().replace(**{"federation.max-update-norm": value})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="max_update_norm must be >= 0"):
        FedAvg(max_update_norm=value)


def test_build_strategy_passes_the_maximum_and_it_is_off_by_default() -> None:
    assert build_strategy(_cfg()).max_update_norm == 0.0
    strategy = build_strategy(_cfg(**{"federation.max-update-norm": 2.5}))
    assert strategy.max_update_norm == 2.5
