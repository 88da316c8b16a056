"""The demos beyond text classification: `fedhaven simulate --preset instruct` (SmolLM2 on
instructions) and `--preset digits` (a small ResNet on images).

Per preset: the federated run with DP (its command's wall time is the preset's goal: under
10 minutes on a 2-core CPU box); then the same rows pooled in one place and trained centrally
through the same `training.train_round`, for the same rounds and steps, with and without DP
(bench/common.py: `centralized`; without DP the recipe's settings the preset leaves "auto"
take their no-DP values). Throughput is training examples
per second in the centralized runs' training phase (one process, the same loop, the same
model), so DP / no DP is the price of per-example clipping and noise on that model. The
metric is the task's first: token-F1 of greedy answers (instruct), macro-F1 (digits).

    python bench/presets.py [--only digits] [-- extra simulate args, e.g. --rounds 1]
"""

from __future__ import annotations

import argparse
from typing import Any

from common import centralized, md_table, report, simulate

from fedhaven.config import AUTO, RECIPE, from_flat, keys
from fedhaven.presets import PRESETS
from fedhaven.tasks import get_task

NAMES = {"token_f1": "token-F1", "macro_f1": "macro-F1"}


def without_dp(flat: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    """The run's config without DP: the recipe's settings the preset leaves to the recipe
    take their values without DP, as `--no-dp` would give them (the run's config holds the
    values with DP)."""
    auto = {k: AUTO for k in RECIPE if k not in preset}
    return {**flat, keys.PRIVACY_ENABLED: False, **auto}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", help="comma-separated preset names (default: all)")
    a, extra = ap.parse_known_args()
    extra = [x for x in extra if x != "--"]
    names = a.only.split(",") if a.only else sorted(PRESETS)
    rows, data = [], []
    for name in names:
        run = simulate(f"presets: {name}", ["--preset", name, *extra])
        flat = run.summary["config"]
        cfg = from_flat(flat)
        metric = get_task(cfg).primary_metric
        central = {
            "DP": centralized(flat, f"{name}, DP"),
            "no DP": centralized(without_dp(flat, PRESETS[name]), f"{name}, no DP"),
        }
        speed = {dp: c["samples"] / c["train_s"] for dp, c in central.items()}
        entry: dict[str, Any] = {
            "preset": name,
            "task": cfg.model.task,
            "metric": metric,
            "sites": cfg.federation.sites,
            "rounds": cfg.federation.rounds,
            "command_s": run.command_s,
            "federated DP": run.summary["global"][metric],
            "max_epsilon": run.summary["max_epsilon"],
            "samples_per_s": speed,
            "dp_slowdown": speed["no DP"] / speed["DP"],
        }
        for dp, c in central.items():
            entry[f"centralized {dp}"] = c["evaluation"][metric]
        data.append(entry)
        rows.append(
            [f"`--preset {name}` ({cfg.model.task})", NAMES.get(metric, metric),
             f"{entry['federated DP']:.3f}", f"{entry['centralized DP']:.3f}",
             f"{entry['centralized no DP']:.3f}",
             f"{entry['command_s'] / 60:.1f}", f"{speed['DP']:.1f}", f"{speed['no DP']:.1f}",
             f"{entry['dp_slowdown']:.2f}"]
        )  # fmt: skip
    header = [
        "preset", "metric", "federated, DP ε=8", "centralized, DP ε=8", "centralized, no DP",
        "DP run, min", "DP examples/s", "no-DP examples/s", "DP slowdown",
    ]  # fmt: skip
    report("presets", md_table(header, rows), presets=data, args=extra)


if __name__ == "__main__":
    main()
