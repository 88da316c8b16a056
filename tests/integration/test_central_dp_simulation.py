"""End to end: central DP with client-side adaptive clipping through Flower's simulation
engine, on top of the sites' own DP-SGD; the site-level ε lands in the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

pytestmark = pytest.mark.slow


def test_central_dp_reports_the_site_level_epsilon(
    tmp_path: Path, tiny_flat: dict[str, object]
) -> None:
    from fedhaven.config import from_flat
    from fedhaven.simulations import simulate

    out = tmp_path / "run"
    summary = simulate(
        from_flat(
            {
                **tiny_flat,
                "privacy.enabled": True,  # record-level at each site, composed with ...
                "privacy.central": "client-adaptive",  # ... site-level at the coordinator
                "privacy.central-noise": 1.0,
                "federation.out-dir": str(out),
            }
        )
    )
    central = summary["central_dp"]
    assert central["mode"] == "client-adaptive" and central["releases"] == 2
    reference = RDPAccountant()
    reference.history = [(1.0, 1.0, 2)]  # both sites in both rounds: no sampling amplification
    assert central["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)
    assert central["clipping_norm"] != 1.0  # the bound adapted from its initial value
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sites_used"] for r in rounds] == [2, 2]
    assert 0 < rounds[0]["central_epsilon"] < rounds[1]["central_epsilon"] == central["epsilon"]
    assert summary["max_epsilon"] > 0  # the sites' own record-level ε is still reported
