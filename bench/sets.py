"""Utility on every text set: federated against centralized, with DP at ε=8 and without.

For each set of bench/textsets.py (the drug reviews, SMS spam, 20 Newsgroups), with the
default command and flags a new user would type on their own CSV (`fedhaven simulate
--data train.csv --test test.csv --text-column text --label-column label --labels ...`) and
10 sites:

- federated, no DP (`--no-dp`) and DP at ε=8 (the default), at each partition (IID and
  Dirichlet(0.5)), one run per seed (`--seeds`, given to simulate as `--seed`);
- centralized, no DP and DP at ε=8 (one per seed): every site's training rows pooled and
  trained through the same `training.train_round` (bench/common.py `centralized`).

Every cell is the median over its seeds. A seed fixes the partition, the initialization and
the order of the minibatches (and the DP noise), so a run without DP repeats exactly but is
still one draw of the partition: it gets the same seeds as a DP run. Under the suite the
cells accumulate over invocations (`--args="--sets newsgroups"` adds that set's cells;
`--privacy 8 --partitions iid` only those). Flags it does not know go to `fedhaven simulate`.
The goals (issue "Models worth deploying"): without DP, federated within 1 macro-F1 point
of centralized at IID and within 2 at Dirichlet(0.5); with DP at ε=8, federated at
Dirichlet(0.5) within 3 points of centralized *without* DP, on the sets of 2,000 rows or
more. Too long for the
suite's half hour: a separate benchmark (`python bench/suite.py --only sets`).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import textsets
from common import (
    centralized,
    earlier_cells,
    md_table,
    merge_cells,
    report,
    runs_root,
    simulate,
    status,
)

from fedhaven.config import keys

NAME = "sets"
PARTITIONS = ("iid", "dirichlet:0.5")
#: What names a cell: one measured again (another slice, the same seed) replaces it.
KEY = ("set", "how", "privacy", "partition", "seed")
#: Federated minus centralized macro-F1, in points, that each goal allows (privacy, partition).
GOALS = {("off", "iid"): 1.0, ("off", "dirichlet:0.5"): 2.0, ("8", "dirichlet:0.5"): 3.0}
#: The DP goal is judged only on sets at least this large (the demo's 600 rows are not).
DP_GOAL_ROWS = 2000


def _scores(ev: dict[str, Any]) -> dict[str, Any]:
    return {"macro_f1": ev["macro_f1"], "accuracy": ev["accuracy"]}


def measure(
    name: str,
    seeds: list[int],
    partitions: list[str],
    privacies: list[str],
    extra: list[str],
    *,
    pooled: bool = True,
) -> list[dict]:
    """The cells of one set: a dict per run (set, how, privacy, partition, seed, scores).
    ``pooled=False`` skips the centralized runs."""
    prepared = textsets.materialize(name, runs_root() / "sets" / name)
    base = [*prepared.flags, "--sites", "10", *extra]
    cells: list[dict[str, Any]] = []
    for privacy in privacies:
        flags = ["--no-dp"] if privacy == "off" else []
        flat: dict[str, Any] = {}
        for partition in partitions:
            for seed in seeds:
                label = f"{name}, federated, privacy {privacy}, {partition}, seed {seed}"
                args = [*base, *flags, "--partition", partition, "--seed", str(seed)]
                run = simulate(label, args)
                flat = run.summary["config"]
                cells.append(
                    {"set": name, "how": "federated", "privacy": privacy,
                     "partition": partition, "seed": seed, "wall_s": run.summary["wall_s"],
                     **_scores(run.summary["global"])}
                )  # fmt: skip
        # pooled: the last partition's sites' training rows (which rows each site holds out
        # for validation, and their order, follow the partition)
        for seed in seeds if pooled else ():
            central = centralized(flat | {keys.TRAIN_SEED: seed}, f"{name} privacy {privacy}")
            cells.append(
                {"set": name, "how": "centralized", "privacy": privacy, "partition": "pooled",
                 "seed": seed, "wall_s": central["wall_s"], **_scores(central["evaluation"])}
            )  # fmt: skip
    for c in cells:
        c["train_rows"] = prepared.train_rows
    return cells


def medians(cells: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, float]]:
    """(set, how, privacy, partition) -> median macro-F1 and accuracy over its seeds."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["set"], c["how"], c["privacy"], c["partition"]), []).append(c)
    return {
        key: {
            "macro_f1": statistics.median(c["macro_f1"] for c in group),
            "accuracy": statistics.median(c["accuracy"] for c in group),
            "runs": len(group),
            "train_rows": group[0]["train_rows"],
        }
        for key, group in groups.items()
    }


def goal_rows(med: dict[tuple[str, str, str, str], dict[str, float]]) -> list[dict[str, Any]]:
    """Each goal that the measured cells can judge: the gap in points and whether it is met.
    Every goal compares with centralized training without DP."""
    out = []
    for (name, how, privacy, partition), m in med.items():
        goal = GOALS.get((privacy, partition))
        central = med.get((name, "centralized", "off", "pooled"))
        if how != "federated" or goal is None or central is None:
            continue
        if privacy != "off" and m["train_rows"] < DP_GOAL_ROWS:
            continue
        gap = 100 * (m["macro_f1"] - central["macro_f1"])
        out.append(
            {"set": name, "privacy": privacy, "partition": partition, "gap": gap,
             "goal": goal, "met": gap >= -goal}
        )  # fmt: skip
    return out


def table(med: dict[tuple[str, str, str, str], dict[str, float]]) -> str:
    rows = []
    for (name, how, privacy, partition), m in sorted(med.items()):
        central = med.get((name, "centralized", "off", "pooled"))
        gap = "" if central is None else f"{100 * (m['macro_f1'] - central['macro_f1']):+.1f}"
        rows.append(
            [name, how, "no DP" if privacy == "off" else f"ε={privacy}", partition,
             m["runs"], f"{m['macro_f1']:.3f}", f"{m['accuracy']:.3f}", gap]
        )  # fmt: skip
    header = ["set", "training", "privacy", "partition", "runs", "macro-F1", "accuracy",
              "vs centralized no DP (points)"]  # fmt: skip
    return md_table(header, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)  # --set is simulate's
    ap.add_argument("--sets", default=",".join(textsets.SETS), help="comma-separated set names")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of every cell (their median)")
    ap.add_argument("--partitions", default=",".join(PARTITIONS))
    ap.add_argument("--privacy", default="off,8", help="'off' (no DP), '8' (ε=8) or both")
    ap.add_argument("--no-centralized", action="store_true", help="skip the centralized rows")
    a, extra = ap.parse_known_args()
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds takes comma-separated integers, not {a.seeds!r}") from None
    seeded = ("--seed=", f"{keys.TRAIN_SEED}=", f"--set={keys.TRAIN_SEED}=")
    if any(x == "--seed" or x.startswith(seeded) for x in extra):
        # each run gets its own --seed after the flags passed through, which would win
        raise SystemExit("the sets benchmark seeds each run itself: give --seeds 0,1,2, not --seed")
    privacies = a.privacy.split(",")
    if not set(privacies) <= {"off", "8"}:
        raise SystemExit(f"--privacy takes 'off', '8' or 'off,8', not {a.privacy!r}")
    names = [textsets.get(n).name for n in a.sets.split(",")]
    cells = []
    for name in names:
        status(f"set {name}")
        cells += measure(
            name, seeds, a.partitions.split(","), privacies, extra, pooled=not a.no_centralized
        )
    cells = merge_cells(earlier_cells(NAME), cells, KEY)  # the sets of earlier slices stay
    med = medians(cells)
    goals = goal_rows(med)
    notes = [
        f"{g['set']}, {'no DP' if g['privacy'] == 'off' else 'ε=' + g['privacy']}, "
        f"{g['partition']}: {g['gap']:+.1f} points against centralized without DP "
        f"(goal: within {g['goal']:.0f}): {'met' if g['met'] else 'not met'}"
        for g in goals
    ]
    report(NAME, table(med), notes, cells=cells, goals=goals, args=[*extra])


if __name__ == "__main__":
    main()
