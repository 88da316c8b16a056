"""End to end: secure aggregation (Flower's SecAgg+) through Flower's simulation engine.

One 3-site, 1-round run of the tiny BERT without DP, with and without
``federation.secure-aggregation``, from the same seed (the sites train the same updates):

* the secure aggregate equals the plain FedAvg within SecAgg+'s quantisation error, bounded
  by hand below from the workflow's parameters;
* the ServerApp never holds a site's tensors: no SecAgg+ reply carries a non-empty tensor
  record, and every masked vector, decoded as if it were one site's, lies far from every
  site's true adapter (spied in the plain run).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow

Q = 2**22  # SecAgg+'s quantisation levels (Flower's default quantization_range)
CLIP = 2.0  # federation.secagg-clip here: the tiny model's weighted tensors lie within it
MAX_WEIGHT = 64.0  # federation.secagg-max-weight here: about one site's training rows


def _bound(num_examples: list[int], peak: float) -> float:
    """|secure − plain| per coordinate, for sites of ``num_examples`` and weights |x| ≤ peak.

    Site k sends q(r_k·x_k), r_k = round(Q·n_k/M)/Q; stochastic rounding is off by less than
    one level, 2·CLIP/Q, per site, and the coordinator divides the sum by R = Σ r_k:
    |E|/R ≤ n·2·CLIP/(Q·R). The weights' rounding, |r_k − n_k/M| ≤ 1/(2Q), moves the
    weighted mean by at most peak·Σ_k |r_k/R − w_k/W| ≤ peak·n/(Q·R). Float32 storage of
    both results adds 2 ulps of the peak.
    """
    n = len(num_examples)
    r = sum(round(Q * k / MAX_WEIGHT) / Q for k in num_examples)
    return n * (2 * CLIP + peak) / (Q * r) + 2 * np.finfo(np.float32).eps * peak


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_flat: dict[str, object]) -> dict[str, Any]:
    from fedhaven.config import from_flat
    from fedhaven.server.checkpoint import CHECKPOINT_DIR, load_checkpoint
    from fedhaven.simulations import simulate
    from fedhaven.strategies import Validated
    from fedhaven.strategies.secagg import SecureAggregationGrid

    flat = {
        **tiny_flat,
        "federation.sites": 3,
        "federation.rounds": 1,
        "federation.fraction-evaluate": 0.0,
        "privacy.enabled": False,
        "federation.secagg-clip": CLIP,
        "federation.secagg-max-weight": MAX_WEIGHT,
    }
    seen: dict[str, list[Any]] = {"screened": [], "stages": []}
    screen, stage = Validated.screen_train, SecureAggregationGrid._stage

    def spy_screen(self, server_round, replies):  # type: ignore[no-untyped-def]
        seen["screened"].append(([m.content for m in replies], dict(self._sent)))
        return screen(self, server_round, replies)

    def spy_stage(self, messages, timeout):  # type: ignore[no-untyped-def]
        replies = stage(self, messages, timeout)
        seen["stages"].extend(m.content for m in replies if not m.has_error())
        return replies

    out: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as mp:  # the ServerApp runs in this process
        mp.setattr(Validated, "screen_train", spy_screen)
        mp.setattr(SecureAggregationGrid, "_stage", spy_stage)
        for secure in (False, True):
            run = tmp_path_factory.mktemp("secure" if secure else "plain")
            summary = simulate(
                from_flat(
                    {
                        **flat,
                        "federation.secure-aggregation": secure,
                        "federation.out-dir": str(run),
                    }
                )
            )
            saved = load_checkpoint(run / CHECKPOINT_DIR)
            assert saved is not None
            out[secure] = {
                "summary": summary,
                "arrays": saved["arrays"],
                "history": saved["history"],
                **dict(zip(("replies", "sent"), seen["screened"].pop(), strict=True)),
            }
    out["stages"] = seen["stages"]
    return out


def _sites(run: dict[str, Any]) -> tuple[list[int], list[dict[str, np.ndarray]]]:
    """Each site's example count and adapter, as the plain run's coordinator received them."""
    examples = [int(c["metrics"]["num-examples"]) for c in run["replies"]]
    return examples, [{k: a.numpy() for k, a in c["arrays"].items()} for c in run["replies"]]


def test_secure_aggregate_equals_fedavg_within_the_quantisation_error(
    runs: dict[str, Any],
) -> None:
    plain, secure = runs[False], runs[True]
    examples, sites = _sites(plain)
    assert len(examples) == 3 and all(n <= MAX_WEIGHT for n in examples)
    peak = max(float(np.abs(a).max()) for s in sites for a in s.values())
    assert peak * max(examples) / MAX_WEIGHT <= CLIP  # else SecAgg+ would clip (sites refuse)
    bound = _bound(examples, peak)
    assert set(secure["arrays"]) == set(plain["arrays"])
    worst = max(
        float(np.abs(secure["arrays"][k] - plain["arrays"][k]).max()) for k in plain["arrays"]
    )
    assert worst <= bound
    # not vacuous: the round moved the adapter by far more than the bound
    moved = max(float(np.abs(a - plain["sent"][k]).max()) for k, a in plain["arrays"].items())
    assert moved > 100 * bound
    # the same start in both runs, and the secure run's coordinator saw only the aggregate
    for k, a in plain["sent"].items():
        np.testing.assert_array_equal(a, secure["sent"][k])
    for content in secure["replies"]:
        for k, a in content["arrays"].items():  # the same float32 values, within a rounding
            ulp = np.finfo(np.float32).eps
            np.testing.assert_allclose(a.numpy(), secure["arrays"][k], rtol=2 * ulp, atol=1e-7)
    # the secure run's report says what SecAgg+ carried: no per-site norms, its own bytes
    line = secure["history"][0]
    assert line["update_norm_median"] is None and line["sites_used"] == 3
    assert line["bytes_received"] > 0 and line["bytes_sent"] > 0


def test_the_server_app_never_holds_a_site_update(runs: dict[str, Any]) -> None:
    from flwr.common import bytes_to_ndarray

    from fedhaven import protocol

    stages = runs["stages"]
    assert len(stages) == 4 * 3  # four SecAgg+ stages, three sites
    examples, adapters = _sites(runs[False])
    sites = [np.concatenate([a.ravel() for a in s.values()]) for s in adapters]
    bound = _bound(examples, CLIP)
    masked = 0
    for content in stages:
        for record in content.array_records.values():  # no tensor in the clear, ever
            assert len(record) == 0
        secagg = content.config_records[protocol.SECAGG]
        if "masked_params" not in secagg:
            continue
        masked += 1
        # Decode the masked vector as if it were site k's: x = (q·2c/Q − c) / r_k (its first
        # entry, the weight, is masked too: the true r_k is used instead).
        vectors = [bytes_to_ndarray(b) for b in secagg["masked_params"]]
        flat = np.concatenate([v.ravel() for v in vectors[1:]]).astype(float)
        for n, true in zip(examples, sites, strict=True):
            decoded = (flat * 2 * CLIP / Q - CLIP) / (round(Q * n / MAX_WEIGHT) / Q)
            assert decoded.shape == true.shape
            assert float(np.median(np.abs(decoded - true))) > 1e4 * bound
    assert masked == 3
