"""flexlora (FlexLoRA, Bai et al., 2024): sites train LoRA at ranks of their own, the
coordinator averages B·A and gives each site a truncated SVD at its rank. Exact when the mean
product fits the rank; otherwise off by exactly the singular values dropped (Eckart–Young)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.config import parse_config_args
from test_fedavg import FakeGrid, reply
from typer.testing import CliRunner

from fedhaven import protocol
from fedhaven.client.app import with_site_rank
from fedhaven.client.mods import allowlist_mod
from fedhaven.config import LORA_RANK, Config
from fedhaven.deploy import site
from fedhaven.errors import FedhavenError
from fedhaven.models import refactor_lora, truncated_lora
from fedhaven.server.app import build_strategy
from fedhaven.simulations import site_settings
from fedhaven.strategies import FlexLoRA

pytestmark = pytest.mark.usefixtures("flower_identity")

# PEFT's names for the LoRA factors of two layers, and a head trained in full
LAYERS = [f"base_model.model.encoder.layer.1.attention.self.{m}" for m in ("query", "value")]
HEAD = "base_model.model.classifier.modules_to_save.default.weight"
OUT, IN = 12, 10


def a_(layer: str) -> str:
    return f"{layer}.lora_A.default.weight"


def b_(layer: str) -> str:
    return f"{layer}.lora_B.default.weight"


def adapter(rank: int, rng: np.random.Generator, product_rank: int | None = None):
    """Random factors at ``rank`` for each layer (B·A of rank ``product_rank``), and a head."""
    arrays = {HEAD: rng.normal(size=(3, IN))}
    for layer in LAYERS:
        b = rng.normal(size=(OUT, rank))
        if product_rank is not None:
            b[:, product_rank:] = 0
        arrays[b_(layer)], arrays[a_(layer)] = b, rng.normal(size=(rank, IN))
    return {k: v.astype(np.float32) for k, v in arrays.items()}


def product(arrays, layer: str) -> np.ndarray:
    return arrays[b_(layer)].astype(np.float64) @ arrays[a_(layer)].astype(np.float64)


def configure(strategy: FlexLoRA, server_round: int, sent, nodes: list[int]) -> list[Message]:
    record = ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sent.items()})
    return list(strategy.configure_train(server_round, record, ConfigRecord(), FakeGrid(nodes)))


def site_reply(node: int, arrays, examples: int = 10) -> Message:
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    return reply(node, tensors, num_examples=examples, train_loss=0.5)


def aggregate(strategy: FlexLoRA, server_round: int, replies: list[Message]):
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    assert arrays is not None and metrics is not None
    return {k: a.numpy() for k, a in arrays.items()}


def received(msg: Message):
    return {k: a.numpy() for k, a in msg.content[protocol.ARRAYS].items()}


def dropped(matrix: np.ndarray, rank: int) -> float:
    """The norm of the singular values past ``rank``: truncated SVD's Frobenius error."""
    return float(np.sqrt((np.linalg.svd(matrix, compute_uv=False)[rank:] ** 2).sum()))


def test_equal_ranks_and_rank_deficient_products_give_the_exact_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    strategy = FlexLoRA()
    configure(strategy, 1, adapter(4, rng), [1, 2, 3])
    sites = [adapter(4, rng, product_rank=1) for _ in range(3)]  # each B·A of rank 1
    examples = [10, 30, 60]
    new = aggregate(
        strategy,
        1,
        [site_reply(n, s, e) for n, s, e in zip((1, 2, 3), sites, examples, strict=True)],
    )
    w = np.array(examples) / sum(examples)
    for layer in LAYERS:
        exact = sum(wi * product(s, layer) for wi, s in zip(w, sites, strict=True))
        assert np.linalg.matrix_rank(exact) == 3  # <= r = 4
        assert new[a_(layer)].shape == (4, IN) and new[b_(layer)].shape == (OUT, 4)
        np.testing.assert_allclose(product(new, layer), exact, rtol=1e-5, atol=1e-5)
        # what FedAvg of the factors would give instead: mean(B)·mean(A) ≠ mean(B·A)
        naive = sum(wi * s[b_(layer)] for wi, s in zip(w, sites, strict=True)) @ sum(
            wi * s[a_(layer)] for wi, s in zip(w, sites, strict=True)
        )
        assert np.abs(naive - exact).max() > 0.1
    head = sum(wi * s[HEAD] for wi, s in zip(w, sites, strict=True))
    np.testing.assert_allclose(new[HEAD], head, rtol=1e-5)
    assert all(v.dtype == np.float32 for v in new.values())
    assert strategy.ranks == {1: 4, 2: 4, 3: 4}


def test_a_mean_above_the_rank_is_off_by_exactly_the_dropped_singular_values() -> None:
    rng = np.random.default_rng(1)
    strategy = FlexLoRA()
    configure(strategy, 1, adapter(2, rng), [1, 2, 3])
    sites = [adapter(2, rng) for _ in range(3)]
    new = aggregate(strategy, 1, [site_reply(n, s) for n, s in zip((1, 2, 3), sites, strict=True)])
    for layer in LAYERS:
        mean = sum(product(s, layer) for s in sites) / 3
        assert np.linalg.matrix_rank(mean) == 6  # > r = 2: cannot be exact
        error = np.linalg.norm(mean - product(new, layer))
        assert error == pytest.approx(dropped(mean, 2), rel=1e-5)
        u, s, vt = np.linalg.svd(mean)  # and it is the truncated SVD itself
        np.testing.assert_allclose(product(new, layer), (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)


def test_ranks_2_4_8_each_site_receives_tensors_of_its_own_rank() -> None:
    rng = np.random.default_rng(2)
    strategy = FlexLoRA()
    ranks = {1: 2, 2: 4, 3: 8}
    start = adapter(8, rng)
    first = configure(strategy, 1, start, list(ranks))
    # ranks not known yet: every site gets the global rank (and truncates it itself)
    assert all(received(m)[a_(LAYERS[0])].shape == (8, IN) for m in first)
    one = protocol.record_nbytes(first[0].content[protocol.ARRAYS])
    new = aggregate(strategy, 1, [site_reply(n, adapter(r, rng)) for n, r in ranks.items()])
    assert strategy.round_stats[1]["sites_used"] == 3  # first replies at their own ranks pass
    assert strategy.round_stats[1]["bytes_sent"] == 3 * one
    assert strategy.ranks == ranks
    assert new[a_(LAYERS[0])].shape == (8, IN)  # the global adapter keeps lora.r

    second = configure(strategy, 2, new, list(ranks))
    for msg in second:
        got, r = received(msg), ranks[msg.metadata.dst_node_id]
        for layer in LAYERS:
            assert got[a_(layer)].shape == (r, IN) and got[b_(layer)].shape == (OUT, r)
            # the best rank-r factorisation of the global product
            error = np.linalg.norm(product(new, layer) - product(got, layer))
            assert error == pytest.approx(dropped(product(new, layer), r), rel=1e-4, abs=1e-5)
        np.testing.assert_array_equal(got[HEAD], new[HEAD])
    by_node = {m.metadata.dst_node_id: m.content[protocol.ARRAYS] for m in second}
    sizes = [protocol.record_nbytes(by_node[n]) for n in sorted(by_node)]  # ranks 2, 4, 8
    assert sizes[0] < sizes[1] < sizes[2] == one
    aggregate(strategy, 2, [site_reply(n, adapter(r, rng)) for n, r in ranks.items()])
    assert strategy.round_stats[2]["bytes_sent"] == sum(sizes)
    assert strategy.round_stats[2]["bytes_received"] == sum(sizes)


def test_replies_of_the_wrong_rank_are_rejected() -> None:
    rng = np.random.default_rng(3)
    strategy = FlexLoRA()
    configure(strategy, 1, adapter(8, rng), [1, 2])
    mixed = adapter(2, rng) | {k: v for k, v in adapter(4, rng).items() if LAYERS[1] in k}
    new = aggregate(strategy, 1, [site_reply(1, adapter(2, rng)), site_reply(2, mixed)])
    assert strategy.round_stats[1]["rejected"] == 1  # one rank per site, in every layer
    assert strategy.ranks == {1: 2}
    configure(strategy, 2, new, [1, 2])
    # site 1 was sent rank 2 and answers at 4: rejected; site 2 is still new, its 4 is fine
    aggregate(strategy, 2, [site_reply(1, adapter(4, rng)), site_reply(2, adapter(4, rng))])
    assert strategy.round_stats[2]["sites_used"] == strategy.round_stats[2]["rejected"] == 1
    assert strategy.ranks == {1: 2, 2: 4}


def test_truncated_lora_keeps_zero_singular_directions_trainable() -> None:
    """Round 1: PEFT starts B at 0, so B·A = 0. The factors at another rank keep B' = 0 and
    give A' orthonormal rows in A's row space (with √S in both factors both would be 0, and
    LoRA's gradients vanish there for good); above the inner rank, more of them."""
    a = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    new_b, new_a = truncated_lora(torch.zeros(32, 8), a, 2)
    assert new_b.abs().max() == 0
    torch.testing.assert_close(new_a @ new_a.T, torch.eye(2), atol=1e-6, rtol=0)
    assert torch.linalg.matrix_rank(torch.cat([a, new_a])) == 8  # within A's rows
    b, a = torch.randn(32, 3), torch.randn(3, 32)
    new_b, new_a = truncated_lora(b, a, 6)
    torch.testing.assert_close(new_b @ new_a, b @ a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_a @ new_a.T, torch.eye(6), atol=1e-6, rtol=0)
    assert new_b[:, 3:].abs().max() == 0


def test_refactor_lora_touches_only_pairs_of_another_rank() -> None:
    rng = np.random.default_rng(4)
    state = {k: torch.from_numpy(v) for k, v in adapter(4, rng).items()}
    assert refactor_lora(state, 4) == state
    two = refactor_lora(state, 2)
    assert two[HEAD] is state[HEAD]
    for layer in LAYERS:
        assert two[a_(layer)].shape == (2, IN) and two[b_(layer)].shape == (OUT, 2)
        full = product({k: v.numpy() for k, v in state.items()}, layer)
        error = np.linalg.norm(full - (two[b_(layer)] @ two[a_(layer)]).double().numpy())
        assert error == pytest.approx(dropped(full, 2), rel=1e-5)


def test_build_strategy_makes_flexlora() -> None:
    cfg = Config().replace(**{"federation.strategy": "flexlora", "federation.min-sites": 3})
    strategy = build_strategy(cfg)
    assert type(strategy) is FlexLoRA and strategy.min_train_nodes == 3


@pytest.mark.parametrize("key", ["federation.update-norm-bound", "federation.max-update-norm"])
def test_flexlora_refuses_norm_bounds(key: str) -> None:
    with pytest.raises(FedhavenError, match=f"'{key}' = 1.0 is invalid: flexlora sends each"):
        Config().replace(**{"federation.strategy": "flexlora", key: 1.0})


# --- the site's rank: node config lora-rank -------------------------------------------------


def _run(strategy: str = "flexlora", **flat: object) -> Config:
    return Config().replace(**{"federation.strategy": strategy, **flat})


def test_site_rank_keeps_alpha_over_r() -> None:
    cfg = _run()  # lora.r = 8, alpha = 16
    assert with_site_rank(cfg, {}) is cfg
    for raw in (4, "4"):
        lora = with_site_rank(cfg, {LORA_RANK: raw}).lora
        assert (lora.r, lora.alpha) == (4, 8)
    assert with_site_rank(_run("fedavg"), {LORA_RANK: 8}) == _run("fedavg")  # the run's own


@pytest.mark.parametrize("raw", [0, -2, "x", "2.5", 2.5, True, ""])
def test_bad_site_rank(raw: object) -> None:
    with pytest.raises(FedhavenError, match=f"site setting 'lora-rank' = {raw!r} is invalid"):
        with_site_rank(_run(), {LORA_RANK: raw})


def test_site_rank_with_another_rule_is_an_error() -> None:
    with pytest.raises(
        FedhavenError,
        match=r"'lora-rank' = 4 differs from the run's lora.r = 8; only "
        r"federation.strategy=flexlora aggregates mixed ranks",
    ):
        with_site_rank(_run("fedavg"), {LORA_RANK: 4})


def test_site_rank_above_the_runs_is_an_error() -> None:
    with pytest.raises(FedhavenError, match=r"'lora-rank' = 16 is above the run's lora.r = 8"):
        with_site_rank(_run(), {LORA_RANK: 16})


def test_site_rank_whose_alpha_is_not_whole_is_an_error() -> None:
    with pytest.raises(FedhavenError, match=r"needs alpha 4.5 at this rank.*multiple of lora.r"):
        with_site_rank(_run(**{"lora.alpha": 12}), {LORA_RANK: 3})


def _sim(strategy: str = "flexlora") -> Config:
    return _run(strategy, **{"federation.sites": 3, "federation.out-dir": "runs/r1"})


@pytest.mark.parametrize("spec", ["2,4,8", [2, 4, 8], "2, 4 ,8"])
def test_simulated_sites_take_one_rank_each(spec: object) -> None:
    sites = site_settings({LORA_RANK: spec}, _sim())
    assert [s[LORA_RANK] for s in sites.values()] == [2, 4, 8]
    assert [s[LORA_RANK] for s in site_settings({LORA_RANK: 4}, _sim()).values()] == [4, 4, 4]


@pytest.mark.parametrize(
    ("spec", "strategy", "match"),
    [
        (
            "2,4",
            "flexlora",
            "'sites.lora-rank' = '2,4' is invalid: give one whole number >= 1 or 3",
        ),
        ("2,x,8", "flexlora", "'sites.lora-rank' = '2,x,8' is invalid"),
        ([0], "flexlora", r"'sites.lora-rank' = \[0\] is invalid"),
        ("2,4,8", "fedavg", "'lora-rank' = 2 differs from the run's lora.r = 8"),
        ("2,4,16", "flexlora", "'lora-rank' = 16 is above the run's lora.r = 8"),
    ],
)
def test_bad_simulated_site_ranks(spec: object, strategy: str, match: str) -> None:
    with pytest.raises(FedhavenError, match=match):
        site_settings({LORA_RANK: spec}, _sim(strategy))


def test_deployed_site_rank_goes_into_the_node_config(tiny_csv: Path) -> None:
    text = site.node_config_text(site.site_from_flags(Path("/d.csv"), Path("/s"), lora_rank=4))
    assert parse_config_args([text])[LORA_RANK] == 4
    with pytest.raises(FedhavenError, match="--lora-rank 0 is invalid: give a whole number >= 1"):
        site.serve(
            coordinator="127.0.0.1:9093",
            certs=None,
            key=None,
            data=tiny_csv,
            state=Path("/nonexistent/state"),
            lora_rank=0,
            insecure=True,
        )


def test_cli_passes_the_site_ranks_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import fedhaven.deploy.site
    import fedhaven.simulations
    from fedhaven.cli import app

    seen: dict[str, object] = {}
    monkeypatch.setattr(fedhaven.simulations, "simulate", lambda flat, **kw: seen.update(kw))
    monkeypatch.setattr("fedhaven.cli._summary_table", lambda summary: None)
    args = ["simulate", "--sites", "3", "--site-rank", "2,4,8", "--verbose"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["sites"] == {"lora-rank": "2,4,8"}
    monkeypatch.setattr(fedhaven.deploy.site, "serve", lambda **kw: seen.update(kw))
    args = ["site", "--coordinator", "h:1", "--data", "d", "--state", str(tmp_path)]
    assert CliRunner().invoke(app, [*args, "--lora-rank", "4"]).exit_code == 0
    assert seen["lora_rank"] == 4


@pytest.mark.parametrize(("rank", "passes"), [(2, True), (8, True), (16, False)])
def test_the_sites_allow_list_passes_lower_ranks_only(rank: int, passes: bool) -> None:
    """A flexlora site truncates what it was sent to its own rank: its reply may carry fewer
    numbers than it received, never more."""
    rng = np.random.default_rng(5)
    sent = {k: Array(v) for k, v in adapter(8, rng).items()}
    msg = Message(
        RecordDict({protocol.ARRAYS: ArrayRecord(sent), protocol.CONFIG: ConfigRecord()}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(v) for k, v in adapter(rank, rng).items()}),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 5}),
        }
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    out = allowlist_mod(msg, context, lambda m, c: Message(content, reply_to=m))
    assert out.has_error() is not passes
