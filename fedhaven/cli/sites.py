"""What a site runs on its own data: ``fedhaven ledger`` (its privacy ledger) and
``fedhaven data`` (its file's checks; the bundled demo data written to files).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedhaven.cli import flags
from fedhaven.cli.common import console
from fedhaven.errors import FedhavenError

ledger_app = typer.Typer(no_args_is_help=True, help="A site's privacy ledger.")


@ledger_app.command("show")
def ledger_show(
    state: Annotated[Path, typer.Option(help="the site's state directory")],
    json_: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Every private round this site trained, and the ε spent over all of them."""
    import json

    from fedhaven.privacy import LEDGER_FILE, Ledger, epsilon_of

    ledger = Ledger(state)
    if not ledger.path.is_file():
        raise FedhavenError(f"no privacy ledger at '{ledger.path}': pass the site's --state DIR")
    entries = ledger.entries()
    deltas = {e["delta"] for e in entries}
    delta = max(deltas) if deltas else None
    total = {
        "rounds": len(entries),
        "steps": sum(e["steps"] for e in entries),
        "delta": delta,
        # at the largest δ any round used: the guarantee that holds for all of them
        "epsilon": epsilon_of(ledger.history(), delta) if delta else 0.0,
    }
    if json_:
        print(json.dumps({"ledger": str(ledger.path), "entries": entries, "total": total}))
        return
    table = Table(title=f"privacy ledger ({LEDGER_FILE})")
    for col in ("time", "run", "round", "steps", "sample rate", "σ", "δ", "ε after"):
        table.add_column(col, justify="right")
    for e in entries:
        table.add_row(
            e["time"],
            str(e["run_id"]),
            str(e["round"]),
            str(e["steps"]),
            f"{e['sample_rate']:.3g}",
            f"{e['noise_multiplier']:.3f}",
            f"{e['delta']:g}",
            f"{e['epsilon']:.2f}",
        )
    console.print(table)
    console.print(
        f"{total['rounds']} rounds, {total['steps']} steps: ε = {total['epsilon']:.2f} "
        f"at δ = {delta:g}"
        if delta
        else "no rounds recorded"
    )


data_app = typer.Typer(
    no_args_is_help=True, help="A site's data, checked where it lives; demo data, written to files."
)


@data_app.command("check")
def data_check(
    file: Annotated[Path, typer.Argument(help="the site's data: csv, tsv, jsonl or parquet")],
    text_column: Annotated[str | None, typer.Option(help="column holding the text")] = None,
    label_column: Annotated[str | None, typer.Option(help="column holding the label")] = None,
    labels: Annotated[str | None, typer.Option(help="the run's label set, comma-separated")] = None,
    config: Annotated[
        Path | None, typer.Option(help="the run's TOML config (data.*, train.seed)")
    ] = None,
    label_rule: flags.LabelRule = "stop",
    min_per_class: flags.MinPerClass = 5,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the report as JSON here")
    ] = None,
) -> None:
    """The checks a site's training runs on its file, and their counts: schema, encoding,
    empty texts, labels, duplicates, rows per class, the train / validation split. Prints
    counts only, never a row; the file is not modified. Exits 2 on a schema or encoding error
    and, under --label-rule stop, on a label defect."""
    import json

    from fedhaven import data as fdata
    from fedhaven.config import SITES_PREFIX, from_flat, keys, load_toml
    from fedhaven.datacheck import DataRules, check_site

    rules = DataRules(label_rule, min_per_class)
    flat = load_toml(config) if config else {}
    flat = {k: v for k, v in flat.items() if not k.startswith(SITES_PREFIX)}  # the sites' own
    given = {keys.DATA_TEXT_COLUMN: text_column, keys.DATA_LABEL_COLUMN: label_column}
    flat |= {k: v for k, v in {**given, keys.DATA_LABELS: labels}.items() if v is not None}
    cfg = from_flat(flat)
    if cfg.model.task != "seq-cls":
        raise FedhavenError(
            f"fedhaven data check reads text classification tables (model.task = seq-cls), "
            f"not {cfg.model.task} data: that is checked when a site loads it"
        )
    if json_out is not None and json_out.resolve() == file.resolve():
        raise FedhavenError(f"--json {json_out} is the data file itself: name another file")
    # The report's warnings are printed below, once: not also as log lines (and the level
    # is given back: a caller in this process keeps its own logging).
    checks_log = logging.getLogger("fedhaven.datacheck")
    level = checks_log.level
    checks_log.setLevel(logging.ERROR)
    source = f"data file '{file}'"
    try:
        table_in = fdata.read_table(str(file))
        checked = check_site(table_in, cfg.data, rules, seed=cfg.train.seed, source=source)
    finally:
        checks_log.setLevel(level)
    report = checked.report
    table = Table(
        title=f"{file.name}: val-fraction {cfg.data.val_fraction:g}, seed "
        f"{cfg.train.seed}, label-rule {rules.label_rule}"
    )
    table.add_column("check")
    table.add_column("rows", justify="right")
    for what, count in report.rows():
        table.add_row(what, count)
    console.print(table)
    for line in report.warnings():
        console.print(f"warning: {line}", highlight=False, soft_wrap=True, markup=False)
    if json_out is not None:
        meta = {"labels": cfg.data.label_names, "val_fraction": cfg.data.val_fraction}
        meta["seed"] = cfg.train.seed
        json_out.write_text(json.dumps({**meta, **report.to_dict()}, indent=2) + "\n")
        console.print(f"report → {json_out}", highlight=False, soft_wrap=True)


@data_app.command("digits")
def data_digits(
    directory: Annotated[Path, typer.Argument(help="a new or empty directory")],
    split: Annotated[
        str, typer.Option(help="all | train | test | public (the bundled splits)")
    ] = "all",
) -> None:
    """scikit-learn's digits (8×8 grayscale, 10 classes) as DIRECTORY/<label>/<index>.png."""
    from fedhaven.tasks.image_cls import export_digits

    n = export_digits(directory, split)
    console.print(f"{n} digit images ({split}) → {directory}", highlight=False, soft_wrap=True)
