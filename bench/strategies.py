"""Aggregation rules on non-IID sites: strategy × partition × privacy on the drug-review demo.

Each cell is one `fedhaven simulate` run with `--sites 10` (default) and the demo's other
defaults (DP-tuned), the rule set by `federation.strategy`: global (held-out) accuracy and
macro-F1, the worst site's validation accuracy under the final model, bytes per round (sent
+ received) and the sites used per round. Without DP the runs take `--no-dp`, the flag a
new user types (the recipe's no-DP values: minibatches, two local epochs). A centralized row per
privacy setting trains every site's training rows pooled through the same loop for the same
rounds and steps (bench/common.py: `centralized`).

``--hostile`` adds the robust rules' table: the same runs with site 0 sending its update
×100 (`--site-update-scale`, a simulation-only site setting), for fedavg (no defence),
fedmedian, trimmedavg, krum, and fedavg with each update clipped to twice the median
update norm of the clean fedavg run (`federation.update-norm-bound`).

The whole grid (8 rules × 4 partitions × 2, ~2 min a run with DP or without) takes hours
on 2 cores, so it is built a slice at a time: under the suite the cells of every earlier
invocation are kept (a cell measured again is replaced), and the table shows them all.
``--seeds 0,1,2`` repeats each cell with those training seeds; the table shows medians.

    python bench/strategies.py --rules fedavg,ffa --partitions iid,dirichlet:0.1 --privacy 8
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable
from typing import Any

from common import (
    Run,
    centralized,
    earlier_cells,
    md_table,
    merge_cells,
    report,
    simulate,
)

from fedhaven.config import STRATEGIES
from fedhaven.run_record import METRICS_FILE

NAME = "strategies"
PARTITIONS = "iid,dirichlet:1.0,dirichlet:0.5,dirichlet:0.1"
#: flexlora needs sites at ranks of their own (a site setting): its own benchmark
RULES = ",".join(r for r in STRATEGIES if r != "flexlora")
#: The hostile site's update factor, and the rows of the robust rules' table.
HOSTILE_SCALE = 100.0
NORM_BOUND = "fedavg + norm bound"
ROBUST = ("fedavg", "fedmedian", "trimmedavg", "krum", NORM_BOUND)
#: What identifies a cell: a cell measured again replaces the earlier one.
KEY = ("rule", "partition", "epsilon", "hostile", "seed")
METRICS = ("macro_f1", "accuracy", "worst_site_accuracy", "bytes_per_round", "sites_used")


def cell(run: Run) -> dict[str, Any]:
    rounds = [json.loads(x) for x in (run.run_dir / METRICS_FILE).read_text().splitlines()]
    g, sites = run.summary["global"], run.summary["sites"].values()
    norms = [r["update_norm_median"] for r in rounds if r.get("update_norm_median") is not None]
    return {
        "macro_f1": g["macro_f1"],
        "accuracy": g["accuracy"],
        "worst_site_accuracy": min(s["accuracy"] for s in sites if s.get("accuracy") is not None),
        "bytes_per_round": statistics.mean(r["bytes_sent"] + r["bytes_received"] for r in rounds),
        "sites_used": statistics.mean(r["sites_used"] for r in rounds),
        "update_norm_median": statistics.median(norms) if norms else None,
        "max_epsilon": run.summary["max_epsilon"],
        "wall_s": run.summary["wall_s"],
    }


def merge(old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with every cell ``new`` measures again replaced, then the new cells."""
    return merge_cells(old, new, KEY)


def medians(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (rule, partition, ε, hostile): each metric's median over the seeds."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault(tuple(c.get(k) for k in KEY[:-1]), []).append(c)
    rows = []
    for key, group in groups.items():
        row = dict(zip(KEY[:-1], key, strict=True)) | {"runs": len(group)}
        for m in METRICS:
            values = [c[m] for c in group if c.get(m) is not None]
            row[m] = statistics.median(values) if values else None
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], hostile: bool) -> str:
    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    order = {p: i for i, p in enumerate(["pooled", *PARTITIONS.split(",")])}
    rules = ["centralized", *RULES.split(","), *ROBUST]
    chosen = sorted(
        (r for r in rows if bool(r.get("hostile")) == hostile),
        key=lambda r: (r["epsilon"] != "8", order.get(r["partition"], 9), rules.index(r["rule"])),
    )
    header = ["partition", "ε", "rule", "macro-F1", "accuracy", "worst-site accuracy",
              "bytes per round", "sites per round", "runs"]  # fmt: skip
    return md_table(
        header,
        [
            [r["partition"], r["epsilon"], r["rule"], fmt(r["macro_f1"], ".3f"),
             fmt(r["accuracy"], ".3f"), fmt(r["worst_site_accuracy"], ".3f"),
             fmt(r["bytes_per_round"], ",.0f"), fmt(r["sites_used"], ".1f"), r["runs"]]
            for r in chosen
        ],
    )  # fmt: skip


def seed_list(text: str) -> list[int]:
    """``--seeds``: comma-separated integers (argparse turns the error into a usage line)."""
    try:
        return [int(s) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers, e.g. 0,1,2") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rules", default=RULES)
    ap.add_argument("--partitions", default=PARTITIONS)
    ap.add_argument("--privacy", default="off,8", help="off and/or target ε values")
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument(
        "--seeds", type=seed_list, default=[], help="training seeds, one run each (default: one)"
    )
    ap.add_argument("--hostile", action="store_true", help="also the hostile-site table")
    ap.add_argument("--no-centralized", action="store_true", help="skip the centralized rows")
    a, extra = ap.parse_known_args()
    seeds: list[int | None] = [*a.seeds] or [None]
    cells: list[dict[str, Any]] = []

    def measure(label: str, base: dict[str, Any], args: list[str]) -> Run:
        run = simulate(label, args)
        cells.append(base | cell(run))
        return run

    for eps in a.privacy.split(","):
        dp = ["--no-dp"] if eps == "off" else ["--epsilon", eps]
        for seed in seeds:
            seeded = [] if seed is None else ["--set", f"train.seed={seed}"]
            common = ["--sites", str(a.sites), *dp, *seeded, *extra]
            base = {"epsilon": eps, "seed": seed, "hostile": False}
            flat = None
            for partition in a.partitions.split(","):
                for rule in a.rules.split(","):
                    args = [*common, "--partition", partition]
                    args += ["--set", f"federation.strategy={rule}"]
                    label = f"strategies: {rule}, {partition}, ε {eps}, seed {seed}"
                    run = measure(label, base | {"rule": rule, "partition": partition}, args)
                    flat = flat or run.summary["config"]
                if a.hostile:
                    hostile_rows(partition, a.sites, common, base, measure)
            if not a.no_centralized and flat is not None:
                central = centralized(flat, f"strategies: centralized, ε {eps}")["evaluation"]
                cells.append(
                    base | {"rule": "centralized", "partition": "pooled"}
                    | {m: central.get(m) for m in METRICS}
                )  # fmt: skip
    everything = merge(earlier_cells(NAME), cells)
    rows = medians(everything)
    hostile = table(rows, hostile=True) if any(r["hostile"] for r in rows) else ""
    report(NAME, table(rows, hostile=False), cells=everything, rows=rows, hostile_table=hostile)
    if hostile:
        print(hostile)


def hostile_rows(
    partition: str,
    sites: int,
    common: list[str],
    base: dict[str, Any],
    measure: Callable[[str, dict[str, Any], list[str]], Run],
) -> None:
    """The robust rules with site 0 sending its update ×HOSTILE_SCALE, and the clean fedavg run
    whose median update norm sets the norm bound (shared with the grid when it ran)."""
    scale = ",".join([f"{HOSTILE_SCALE:g}"] + ["1"] * (sites - 1))
    args = [*common, "--partition", partition]
    clean = simulate("strategies: clean fedavg", [*args, "--set", "federation.strategy=fedavg"])
    norm = cell(clean)["update_norm_median"]
    if not norm:  # a bound of 0 would switch norm bounding off, not bound anything
        raise SystemExit("the clean fedavg run reported no update norms: no bound to set")
    for rule in ROBUST:
        settings = ["--set", f"federation.strategy={'fedavg' if rule == NORM_BOUND else rule}"]
        if rule == NORM_BOUND:
            settings += ["--set", f"federation.update-norm-bound={2 * norm:.6g}"]
        label = f"strategies: {rule}, site 0 ×{HOSTILE_SCALE:g}, {partition}"
        info = base | {"rule": rule, "partition": partition, "hostile": True}
        measure(label, info, [*args, *settings, "--site-update-scale", scale])


if __name__ == "__main__":
    main()
