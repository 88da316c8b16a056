"""End to end: the aggregation rules run a 3-site, 2-round simulation of the tiny BERT
through Flower's simulation engine, and report each round's sites and bytes.

Every rule runs (about 15 s each on 2 cores): fedprox (DP on: the proximal term's path under
Opacus, and the key it sends), fedadam and fedyogi (server optimizer state across rounds),
fedmedian with norm bounding (Flower pops the arrays from the replies; the bound needs the
arrays sent), trimmedavg, krum (selects one site's update), ffa under DP (LoRA's A frozen at
every site: half the tensors on the wire), flexlora with sites at LoRA ranks 2, 4 and 8 (each
gets, and sends, tensors of its own rank); fedavg is tests/integration/test_simulation.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("name", "flat"),
    [
        ("fedprox", {"privacy.enabled": True}),
        ("ffa", {"privacy.enabled": True}),
        ("fedadam", {}),
        ("fedyogi", {}),
        ("fedmedian", {"federation.update-norm-bound": 0.5}),
        ("trimmedavg", {"federation.trim-beta": 0.34}),
        ("krum", {"federation.krum-byzantine": 0}),
    ],
    ids=[
        "fedprox-dp",
        "ffa-dp",
        "fedadam",
        "fedyogi",
        "fedmedian-norm-bound",
        "trimmedavg",
        "krum",
    ],
)
def test_rule_runs_a_simulation(
    name: str, flat: dict[str, object], tmp_path: Path, tiny_flat: dict[str, object]
) -> None:
    from fedhaven.config import from_flat
    from fedhaven.simulations import simulate

    out = tmp_path / "run"
    summary = simulate(
        from_flat(
            {
                **tiny_flat,
                "federation.sites": 3,
                "federation.strategy": name,
                "privacy.enabled": False,
                "federation.out-dir": str(out),
                **flat,
            }
        )
    )
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["rounds"] == 2 and len(summary["sites"]) == 3
    assert summary["config"]["federation.strategy"] == name
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["sites_used"] == 3 and r["rejected"] == 0
        assert r["bytes_sent"] == 3 * summary["bytes_per_site_round"]
        assert r["bytes_received"] == 3 * summary["bytes_per_site_round"]
        assert 0 <= r["global"]["macro_f1"] <= 1


def test_flexlora_runs_a_simulation_with_mixed_ranks(
    tmp_path: Path, tiny_flat: dict[str, object]
) -> None:
    from fedhaven import protocol
    from fedhaven.client.app import with_site_rank
    from fedhaven.config import LORA_RANK, from_flat
    from fedhaven.models import adapter_state, build_model
    from fedhaven.simulations import simulate

    out = tmp_path / "run"
    flat = {
        **tiny_flat,
        "federation.sites": 3,
        "federation.strategy": "flexlora",
        "privacy.enabled": False,
        "federation.out-dir": str(out),
    }
    summary = simulate(from_flat(flat), sites={LORA_RANK: "2,4,8"})
    assert summary["rounds"] == 2 and len(summary["sites"]) == 3

    def nbytes(rank: int) -> int:  # a site's adapter (LoRA at that rank, and the head)
        cfg = with_site_rank(from_flat(flat), {LORA_RANK: rank})
        return protocol.record_nbytes(protocol.to_record(adapter_state(build_model(cfg))))

    own = nbytes(2) + nbytes(4) + nbytes(8)
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    # round 1: no site's rank known yet, each gets lora.r = 8; from round 2 its own
    assert rounds[0]["bytes_sent"] == 3 * summary["bytes_per_site_round"] == 3 * nbytes(8)
    assert rounds[1]["bytes_sent"] == own < 3 * nbytes(8)
    for r in rounds:
        assert r["sites_used"] == 3 and r["rejected"] == 0
        assert r["bytes_received"] == own  # every site answers at its own rank
        assert 0 <= r["global"]["macro_f1"] <= 1
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_a_hostile_site_reaches_the_coordinator_scaled(
    tmp_path: Path, tiny_flat: dict[str, object]
) -> None:
    """The harness's hostile site (``update-scale``) through the engine: its update arrives
    ×100, which the round's update norms show, and the run's summary names it."""
    from fedhaven.config import UPDATE_SCALE, from_flat
    from fedhaven.simulations import simulate

    out = tmp_path / "run"
    flat = {**tiny_flat, "federation.sites": 3, "privacy.enabled": False}
    summary = simulate(
        from_flat({**flat, "federation.out-dir": str(out)}), sites={UPDATE_SCALE: "100,1,1"}
    )
    assert summary["simulated_update_scale"] == {"0": 100.0}
    # the report and the adapter's card warn that this was no clean run
    for doc in (out / "report.md", out / "adapter" / "model_card.md"):
        assert (
            "Hostile-site simulation" in doc.read_text() and "partition 0 ×100" in doc.read_text()
        )
    for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()):
        # two honest updates of similar length and one 100 times its own length
        assert r["update_norm_max"] > 20 * r["update_norm_median"] > 0
