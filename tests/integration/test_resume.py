"""End to end: a simulated DP run killed after round 1 and resumed with ``federation.resume``
ends after the planned rounds, repeats none, and leaves each site's ledger whole: one noisy
label histogram per site over both runs (kept on the site's disk), ε within the target."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedhaven.privacy import PRIOR_FILE, Ledger, prior_noise

pytestmark = pytest.mark.slow


class Killed(Exception):
    """What stops the coordinator after round 1 (its checkpoint is on disk by then)."""


def _kill_after_round_1(line: dict[str, Any]) -> None:
    if line["round"] == 1:
        raise Killed


def test_a_killed_run_resumes_from_its_checkpoint(
    tmp_path: Path, tiny_flat: dict[str, object]
) -> None:
    from fedhaven.config import from_flat
    from fedhaven.simulations import simulate

    out = tmp_path / "run"
    flat = {
        **tiny_flat,
        "privacy.enabled": True,
        "federation.rounds": 3,
        "federation.out-dir": str(out),
    }
    # the progress callback runs inside the ServerApp: Flower's simulation ends and hands
    # the coordinator's exception back to the caller
    with pytest.raises(Killed):
        simulate(from_flat(flat), progress=_kill_after_round_1)
    assert not (out / "summary.json").exists()
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in first] == [1]

    seen: list[int] = []
    summary = simulate(
        from_flat({**flat, "federation.resume": True}),
        progress=lambda line: seen.append(line["round"]),
    )
    assert seen == [2, 3]
    assert summary["rounds"] == 3 and summary["resumed_after_round"] == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert lines[0] == first[0]  # round 1's line is the first run's, kept
    # Flower numbers the sites anew in the second run; their data fingerprints match
    assert len(summary["sites"]) == 2
    assert all(s["last_round"] == 3 for s in summary["sites"].values())

    target = float(flat.get("privacy.epsilon", 8.0))  # type: ignore[arg-type]
    prior = (prior_noise(from_flat(flat).privacy), 1.0, 1)
    for i in range(2):
        state = out / "sites" / f"site-{i}"
        entries = Ledger(state).entries()
        assert [e["round"] for e in entries] == [1, 2, 3]
        # round 1 from the first run, rounds 2 and 3 from the second
        assert entries[0]["run_id"] != entries[1]["run_id"] == entries[2]["run_id"]
        # one σ, planned for all 3 rounds, in both runs
        assert len({e["noise_multiplier"] for e in entries}) == 1
        # the resumed run's sites lost their run memory but read the noisy label histogram
        # back from their disk: released once over both runs, as the noise plan counts it
        releases = [tuple(r) for e in entries for r in e["releases"]]
        assert releases.count(prior) == 1 and tuple(entries[0]["releases"][0]) == prior
        assert (state / PRIOR_FILE).is_file()
        assert target * 0.99 < entries[-1]["epsilon"] <= target + 1e-9
    assert summary["max_epsilon"] <= target + 1e-9
