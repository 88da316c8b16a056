"""Utility: federated (with DP at ε=8 and without) against centralized training, on the demo.

Federated: `fedhaven simulate` with the defaults (4 sites, Dirichlet(1.0), 5 rounds, DP at
ε=8), with --no-dp, and (``--preset``) with the no-DP preset, each in its own process.
Centralized: the same rows in one place — every site's training split pooled — trained with
the same model and config through the same `training.train_round`, in this process, for the
same rounds and the same number of optimizer steps per round: the batch is the sites' batch
times the number of sites, so each step samples the same share of the data (under DP: the
same sampling rate, steps and ε, hence the same noise multiplier, on a batch as large as
all the sites' together). Held-out accuracy and macro-F1 on the 379 test reviews. Extra
arguments go to every run (e.g. --rounds 3); the centralized runs read each run's config.
"""

from __future__ import annotations

import argparse

from common import (
    DEMO_RUNS,
    DP_RUN,
    NO_DP_RUN,
    PRESET_RUN,
    centralized,
    majority_baseline,
    md_table,
    report,
    simulate,
)

from fedhaven.config import from_flat

RUNS = {name: DEMO_RUNS[name] for name in (DP_RUN, NO_DP_RUN)}
PRESET_RUNS = {PRESET_RUN: DEMO_RUNS[PRESET_RUN]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", action="store_true", help="also the no-DP preset, both ways")
    a, extra = ap.parse_known_args()
    runs = RUNS | (PRESET_RUNS if a.preset else {})
    rows, data, batches, pooled = [], [], {}, 0
    for name, args in runs.items():
        run = simulate(f"utility: federated {name}", [*extra, *args])
        central = centralized(run.summary["config"], name)
        batches[name] = [from_flat(run.summary["config"]).train.batch_size, central["batch"]]
        pooled = central["rows"]
        for how, ev, eps, wall in (
            ("federated", run.summary["global"], run.summary["max_epsilon"], run.summary["wall_s"]),
            ("centralized", central["evaluation"], central["max_epsilon"], central["wall_s"]),
        ):
            rows.append(
                [f"{how}, {name}", f"{ev['macro_f1']:.3f}", f"{ev['accuracy']:.3f}",
                 " / ".join(f"{f:.2f}" for f in ev["per_class_f1"]),
                 "-" if eps is None else f"{eps:.2f}", f"{wall:.0f}"]
            )  # fmt: skip
            data.append(
                {"how": how, "name": name, "macro_f1": ev["macro_f1"],
                 "accuracy": ev["accuracy"], "per_class_f1": ev["per_class_f1"],
                 "max_epsilon": eps, "wall_s": wall}
            )  # fmt: skip
    header = ["training", "macro-F1", "accuracy", "per-class F1", "ε", "wall s"]
    cfg = from_flat(run.summary["config"])
    report(
        "utility",
        md_table(header, rows),
        rows=data,
        batches=batches,
        pooled_rows=pooled,
        majority=majority_baseline(cfg),
        sites=cfg.federation.sites,
        rounds=cfg.federation.rounds,
        args=extra,
    )


if __name__ == "__main__":
    main()
