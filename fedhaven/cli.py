"""``fedhaven`` command line. User errors print one line and exit 2, without a traceback."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedhaven.errors import FedhavenError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False
)
console = Console()
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Federated, differentially private LoRA fine-tuning on Flower."""


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


#: How a metric is named on screen (the rest: its name with spaces).
_NAMES = {"macro_f1": "macro-F1", "token_f1": "token-F1", "exact_match": "exact match"}


def _scores(g: dict[str, Any]) -> str:
    """``macro-F1 0.612  accuracy 0.700``: every metric of a task's evaluation but loss."""
    return "  ".join(
        f"{_NAMES.get(k, k)} {v:.3f}"
        for k, v in g.items()
        if k != "loss" and isinstance(v, int | float)
    )


def _progress(line: dict[str, Any]) -> None:
    g = line["global"]
    console.print(
        f"round {line['round']:>3}  {line['wall_s']:7.1f}s  {_scores(g)}  "
        f"max site ε {_fmt(line['max_epsilon'], 2)}"
        + ("" if line["central_epsilon"] is None else f"  central ε {line['central_epsilon']:.2f}")
    )


def _summary_table(summary: dict[str, Any]) -> None:
    g = summary["global"]
    console.print(
        f"\n[bold]global[/bold] (held-out set): {_scores(g)}"
        + (
            "  per-class F1 "
            + ", ".join(
                f"{n} {f:.2f}" for n, f in zip(summary["labels"], g["per_class_f1"], strict=True)
            )
            if "per_class_f1" in g
            else ""
        )
    )
    from fedhaven.report import NEVER_PREDICTED  # matplotlib: loaded already by the run

    if missing := summary.get(NEVER_PREDICTED):
        console.print(
            f"[yellow]warning:[/yellow] the final model never predicts {', '.join(missing)} "
            "(see report.md)"
        )
    scores = [m for m in summary.get("metrics", ["accuracy", "macro_f1"]) if m != "loss"]
    table = Table(title="sites")
    for col in ("site", "examples", *(f"val {_NAMES.get(m, m)}" for m in scores), "ε"):
        table.add_column(col, justify="right")
    for i, (node, s) in enumerate(sorted(summary["sites"].items()), start=1):
        table.add_row(
            f"{i} ({node})",
            str(s["examples"]),
            *(_fmt(s.get(m)) for m in scores),
            _fmt(s["epsilon"], 2),
        )
    console.print(table)
    delta = summary["delta"]
    console.print(
        f"rounds {summary['rounds']}  wall {summary['wall_s']:.0f}s  "
        f"{summary['bytes_per_site_round'] / 1e6:.2f} MB per site per round "
        f"(full model {summary['full_model_bytes'] / 1e6:.3g} MB)  "
        + (f"δ {delta:g}  " if delta else "no DP  ")
        + (
            f"central DP ({central['mode']}): site-level ε {central['epsilon']:.2f}  "
            if (central := summary["central_dp"])
            else ""
        )
        + f"→ {summary['run_dir']}"
    )


def _parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise FedhavenError(
                f"--set {item!r} is not KEY=VALUE: e.g. --set train.learning-rate=0.01"
            )
        out[key.strip()] = value.strip()
    return out


@app.command()
def simulate(
    rounds: Annotated[int | None, typer.Option(help="federation rounds")] = None,
    sites: Annotated[int | None, typer.Option(help="simulated sites")] = None,
    data: Annotated[str | None, typer.Option(help="training data: csv, jsonl or parquet")] = None,
    test: Annotated[
        str | None, typer.Option(help="held-out set for server-side evaluation")
    ] = None,
    text_column: Annotated[str | None, typer.Option(help="column holding the text")] = None,
    label_column: Annotated[str | None, typer.Option(help="column holding the label")] = None,
    labels: Annotated[str | None, typer.Option(help="comma-separated label set, in order")] = None,
    partition: Annotated[
        str | None, typer.Option(help="iid | dirichlet:ALPHA | column:NAME")
    ] = None,
    epsilon: Annotated[float | None, typer.Option(help="target ε per site over the run")] = None,
    no_dp: Annotated[
        bool, typer.Option("--no-dp", help="train without differential privacy")
    ] = False,
    model: Annotated[str | None, typer.Option(help="local Hugging Face model directory")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank")] = None,
    seed: Annotated[int | None, typer.Option(help="seed for partitioning and init")] = None,
    out: Annotated[
        Path | None, typer.Option(help="run directory (default runs/<timestamp>)")
    ] = None,
    site_budget: Annotated[
        str | None,
        typer.Option(help="each simulated site's own ε budget: one number, or one per site"),
    ] = None,
    site_state: Annotated[
        Path | None,
        typer.Option(help="root of the sites' state dirs (ledgers); reuse it to keep spending"),
    ] = None,
    site_rank: Annotated[
        str | None,
        typer.Option(help="each simulated site's LoRA rank (flexlora): one, or one per site"),
    ] = None,
    site_update_scale: Annotated[
        str | None,
        typer.Option(
            help="research: each simulated site's update is multiplied by this before it is "
            "sent (one per site, e.g. 100,1,1 for one hostile site); default 1"
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file of run-config keys")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="any run-config KEY=VALUE")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="a named demo (instruct: SmolLM2; digits: images); flags override it"),
    ] = None,
    task: Annotated[str | None, typer.Option(help="seq-cls | causal-lm | image-cls")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the run in --out from its last round")
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="run the sites on this existing Ray cluster (HOST:PORT of its head, as "
            "'ray start --head' prints it) instead of a Ray started here for the run"
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's logs")] = False,
) -> None:
    """Run N simulated sites on this machine (or a Ray cluster) with Flower's simulation
    engine."""
    from fedhaven.config import (
        EPSILON_BUDGET,
        LORA_RANK,
        STATE_DIR,
        UPDATE_SCALE,
        from_flat,
        load_toml,
    )
    from fedhaven.presets import preset as preset_overrides

    flags: dict[str, Any] = {
        "federation.rounds": rounds,
        "federation.sites": sites,
        "data.path": data,
        "data.test-path": test,
        "data.text-column": text_column,
        "data.label-column": label_column,
        "data.labels": labels,
        "data.partition": partition,
        "privacy.epsilon": epsilon,
        "privacy.enabled": False if no_dp else None,
        "model.path": model,
        "model.task": task,
        "lora.r": lora_r,
        "train.seed": seed,
        "federation.out-dir": str(out) if out else None,
        "federation.resume": True if resume else None,
    }
    flat = preset_overrides(preset) if preset else {}
    flat |= {**(load_toml(config) if config else {}), **_parse_set(set_ or [])}
    flat |= {k: v for k, v in flags.items() if v is not None}
    # The sites' own settings (a [sites] table, --site-*) stay out of the run config.
    sites = {k[len("sites.") :]: flat.pop(k) for k in [k for k in flat if k.startswith("sites.")]}
    sites |= {
        k: v
        for k, v in {
            EPSILON_BUDGET: site_budget,
            STATE_DIR: site_state,
            LORA_RANK: site_rank,
            UPDATE_SCALE: site_update_scale,
        }.items()
        if v is not None
    }
    cfg = from_flat(flat)  # validate before the heavy imports and anything else starts
    from fedhaven.simulations import simulate as run

    if not verbose:
        from transformers.utils import logging as hf_logging

        # One line per round is the output; Flower's notices (run_simulation's deprecation
        # among them) and library warnings go to --verbose. Failed sites are still logged.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore")
    summary = run(cfg, progress=_progress, verbose=verbose, sites=sites, ray_address=ray_address)
    _summary_table(summary)


@app.command()
def predict(
    adapter: Annotated[Path, typer.Option(help="a trained adapter directory (RUN/adapter)")],
    input_path: Annotated[
        Path, typer.Option("--input", help="rows to predict: csv, jsonl, parquet (or images)")
    ],
    output: Annotated[
        Path | None, typer.Option(help="write .csv or .jsonl (default: JSON lines on stdout)")
    ] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing --output")] = False,
) -> None:
    """Apply a trained adapter to new rows: labels with probabilities, or generated text."""
    from fedhaven import predict as fpredict

    fpredict.check_output(output, force)
    rows = fpredict.predict(adapter, input_path)
    fpredict.write(rows, output)
    if output is not None:
        console.print(f"{len(rows)} predictions → {output}")


ledger_app = typer.Typer(no_args_is_help=True, help="A site's privacy ledger.")
app.add_typer(ledger_app, name="ledger")


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


certs_app = typer.Typer(no_args_is_help=True, help="TLS certificates and site keys.")
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
def certs_init(
    directory: Annotated[Path, typer.Argument(help="where the coordinator keeps its PKI")],
    san: Annotated[
        list[str] | None,
        typer.Option(help="a DNS name or IP the coordinator is reached at (repeatable)"),
    ] = None,
    days: Annotated[int, typer.Option(help="validity of the certificates")] = 365,
    force: Annotated[bool, typer.Option(help="replace existing keys and certificates")] = False,
) -> None:
    """A CA and the coordinator's TLS certificate (default SANs: localhost, 127.0.0.1)."""
    from fedhaven.deploy.certs import init_ca

    sans = tuple(san) if san else ("localhost", "127.0.0.1")
    for role, path in init_ca(directory, sans=sans, days=days, force=force).items():
        console.print(f"{role:12} {path}", highlight=False, soft_wrap=True)


@certs_app.command("site")
def certs_site(
    name: Annotated[str, typer.Argument(help="the site's name: letters, digits, - and _")],
    directory: Annotated[Path, typer.Argument(help="where the site keeps its key")],
    force: Annotated[bool, typer.Option(help="replace an existing key pair")] = False,
) -> None:
    """A site's SuperNode authentication key pair: NAME.key stays, NAME.pub is registered."""
    from fedhaven.deploy.certs import site_keys

    for role, path in site_keys(name, directory, force=force).items():
        console.print(f"{role:12} {path}", highlight=False, soft_wrap=True)


@app.command("coordinator")
def coordinator_cmd(
    state: Annotated[
        Path,
        typer.Option(
            help="the coordinator's state: SuperLink database, flwr connection",
            readable=False,  # fedhaven checks paths itself, in one line naming the fix
        ),
    ],
    certs: Annotated[
        Path | None, typer.Option(help="the PKI from `fedhaven certs init DIR`", readable=False)
    ] = None,
    sites: Annotated[
        Path | None,
        typer.Option(help="directory of the sites' NAME.pub keys to register", readable=False),
    ] = None,
    host: Annotated[str, typer.Option(help="address the SuperLink listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the SuperLink's one HTTPS port")] = 9093,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="no TLS, no node authentication: tests only")
    ] = False,
) -> None:
    """Run the coordinator's Flower SuperLink (TLS, site authentication) until Ctrl-C.

    Registers the sites' keys and prints the `flwr run` line that starts a federation.
    """
    from fedhaven.deploy.coordinator import serve

    serve(certs=certs, state=state, sites=sites, host=host, port=port, insecure=insecure)


@app.command("site")
def site_cmd(
    coordinator: Annotated[str, typer.Option(help="the coordinator's HOST:PORT")],
    # readable=False: fedhaven checks these paths itself, in one line naming the fix
    data: Annotated[
        Path,
        typer.Option(help="this site's labeled data: csv, jsonl or parquet", readable=False),
    ],
    state: Annotated[
        Path, typer.Option(help="this site's state directory (privacy ledger)", readable=False)
    ],
    certs: Annotated[
        Path | None,
        typer.Option(help="the coordinator's ca.crt, or the directory holding it", readable=False),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(help="this site's NAME.key from `fedhaven certs site`", readable=False),
    ] = None,
    epsilon_budget: Annotated[
        float | None, typer.Option(help="this site's ε limit over all its runs")
    ] = None,
    delta: Annotated[float | None, typer.Option(help="this site's δ for that limit")] = None,
    lora_rank: Annotated[
        int | None, typer.Option(help="this site's LoRA rank (federation.strategy=flexlora)")
    ] = None,
    label_rule: Annotated[
        str,
        typer.Option(
            help="a label outside the run's set, or differing only by case or whitespace: "
            "drop | map | stop (see `fedhaven data check`)"
        ),
    ] = "stop",
    min_per_class: Annotated[int, typer.Option(help="warn below this many rows per class")] = 5,
    port: Annotated[int, typer.Option(help="the SuperNode's local Runtime API port")] = 9094,
    max_wait: Annotated[
        float, typer.Option(help="seconds to keep retrying an unreachable coordinator")
    ] = 120.0,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="no TLS, no node authentication: tests only")
    ] = False,
    cold_start: Annotated[
        bool,
        typer.Option(
            "--cold-start",
            help="start every message's ClientApp process from scratch (no warm start)",
        ),
    ] = False,
) -> None:
    """Run this site's Flower SuperNode with fedhaven's ClientApp until Ctrl-C."""
    from fedhaven.datacheck import DataRules
    from fedhaven.deploy.site import serve

    serve(
        coordinator=coordinator,
        certs=certs,
        key=key,
        data=data,
        state=state,
        epsilon_budget=epsilon_budget,
        delta=delta,
        lora_rank=lora_rank,
        rules=DataRules(label_rule, min_per_class),
        port=port,
        max_wait_s=max_wait,
        insecure=insecure,
        warm_start=not cold_start,
    )


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
) -> None:
    """Write RUN_DIR/report.md and RUN_DIR/plots/*.png again from the run's files."""
    from fedhaven.report import write_report

    console.print(f"wrote {write_report(run_dir)}", highlight=False, soft_wrap=True)


@app.command()
def export(
    adapter: Annotated[Path, typer.Option(help="a trained adapter directory (RUN/adapter)")],
    merge: Annotated[Path, typer.Option(help="new directory for the merged, standalone model")],
) -> None:
    """Merge the adapter into its base model: a directory `from_pretrained` loads.

    The default mean-pooling head loads with
    AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True).
    """
    from transformers.utils import logging as hf_logging

    from fedhaven.models import export_merged

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    console.print(f"wrote {export_merged(adapter, merge)}", highlight=False, soft_wrap=True)


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="a run directory written by fedhaven simulate")],
    site: Annotated[int, typer.Option(help="the site whose training rows are the members")] = 0,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for the interval")] = 1000,
    seed: Annotated[int, typer.Option(help="seed for the label matching and bootstrap")] = 0,
    json_: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Membership-inference attack (loss threshold) on a simulated run's final model.

    RUN_DIR is a run directory written by `fedhaven simulate`. Members: the site's training
    rows; non-members: held-out rows with the same labels. Reports the attack's ROC AUC.
    """
    import json

    from transformers.utils import logging as hf_logging

    from fedhaven.audit import audit as run_audit

    # the result is one line: no load reports, progress bars or library warnings
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    result = run_audit(run_dir, site=site, bootstrap=bootstrap, seed=seed)
    if json_:
        print(json.dumps(result))
        return
    eps = result["epsilon"]
    console.print(
        f"membership inference (loss threshold), site {site}: AUC {result['auc']:.3f} "
        f"[{result['ci_low']:.2f}, {result['ci_high']:.2f}] over {result['members']} members / "
        f"{result['non_members']} non-members; "
        + ("run without DP" if eps is None else f"run ε={eps:.1f}"),
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def tune(
    trials: Annotated[int, typer.Option(help="trials to run now (added to the study's)")],
    out: Annotated[
        Path, typer.Option(help="where trial runs (trial-<n>/) and best.toml go")
    ] = Path("runs/tune"),
    storage: Annotated[
        Path | None, typer.Option(help="the study's SQLite file (default OUT/study.db)")
    ] = None,
    study: Annotated[str, typer.Option(help="study name; the same name resumes it")] = "fedhaven",
    config: Annotated[Path | None, typer.Option(help="TOML file of run-config keys")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="any run-config KEY=VALUE")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the sampler (train.seed is a --set key)")] = 0,
    verbose: Annotated[bool, typer.Option(help="show Optuna's, Flower's and Ray's logs")] = False,
) -> None:
    """Search learning rates, LoRA rank, local steps and clip norm at a fixed ε (Optuna).

    Each trial is a simulated federation; the score is the sites' validation macro-F1 in the
    last round (never the held-out set). Writes OUT/best.toml for `simulate --config`.
    """
    from fedhaven.config import from_flat, load_toml

    if trials < 1:
        raise FedhavenError(f"--trials {trials} runs nothing: give at least 1")
    flat = {**(load_toml(config) if config else {}), **_parse_set(set_ or [])}
    from_flat(flat)  # validate before the heavy imports and anything else starts
    from fedhaven.simulations.tune import tune as run

    if not verbose:
        from transformers.utils import logging as hf_logging

        logging.getLogger("flwr").setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore")

    def progress(row: dict[str, Any]) -> None:
        params = "  ".join(f"{k} {v:.3g}" for k, v in row["params"].items())
        score = _fmt(row["value"]) if row["state"] == "COMPLETE" else row["state"].lower()
        console.print(
            f"trial {row['number']:>3}  val macro-F1 {score}  {params}",
            highlight=False,
            soft_wrap=True,
        )

    result = run(
        flat,
        trials,
        out=out,
        storage=storage,
        study_name=study,
        seed=seed,
        progress=progress,
        verbose=verbose,
    )
    keys = list(dict.fromkeys(k for row in result["history"] for k in row["params"]))
    table = Table(title=f"study {result['study']} ({result['storage']})")
    # short headers keep the table within 80 columns
    short = {
        "train.learning-rate": "lr",
        "train.lora-learning-rate": "LoRA lr",
        "lora.r": "r",
        "train.local-steps": "steps",
        "privacy.max-grad-norm": "clip",
    }
    for col in ("trial", "val F1", "test F1", *(short.get(k, k) for k in keys)):
        table.add_column(col, justify="right")
    for row in result["history"]:
        table.add_row(
            str(row["number"]),
            _fmt(row["value"]) if row["state"] == "COMPLETE" else row["state"].lower(),
            _fmt(row["test_macro_f1"]),
            *(f"{row['params'][k]:.3g}" if k in row["params"] else "-" for k in keys),
        )
    console.print(table)
    console.print(
        f"best val macro-F1 {result['best_value']:.3f} of {result['trials']} complete trials "
        f"→ {result['best_config_path']}  (fedhaven simulate --config FILE)",
        highlight=False,
        soft_wrap=True,
    )


data_app = typer.Typer(
    no_args_is_help=True, help="A site's data, checked where it lives; demo data, written to files."
)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    file: Annotated[Path, typer.Argument(help="the site's data: csv, tsv, jsonl or parquet")],
    text_column: Annotated[str | None, typer.Option(help="column holding the text")] = None,
    label_column: Annotated[str | None, typer.Option(help="column holding the label")] = None,
    labels: Annotated[str | None, typer.Option(help="the run's label set, comma-separated")] = None,
    config: Annotated[
        Path | None, typer.Option(help="the run's TOML config (data.*, train.seed)")
    ] = None,
    label_rule: Annotated[
        str,
        typer.Option(
            help="a label outside the set, or differing only by case or whitespace: "
            "drop | map | stop"
        ),
    ] = "stop",
    min_per_class: Annotated[int, typer.Option(help="warn below this many rows per class")] = 5,
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
    from fedhaven.config import from_flat, load_toml
    from fedhaven.datacheck import DataRules, check_site

    rules = DataRules(label_rule, min_per_class)
    flat = load_toml(config) if config else {}
    flat = {k: v for k, v in flat.items() if not k.startswith("sites.")}  # the sites' own
    given = {"data.text-column": text_column, "data.label-column": label_column}
    flat |= {k: v for k, v in {**given, "data.labels": labels}.items() if v is not None}
    cfg = from_flat(flat)
    if cfg.model.task != "seq-cls":
        raise FedhavenError(
            f"fedhaven data check reads text classification tables (model.task = seq-cls), "
            f"not {cfg.model.task} data: that is checked when a site loads it"
        )
    if json_out is not None and json_out.resolve() == file.resolve():
        raise FedhavenError(f"--json {json_out} is the data file itself: name another file")
    # The report's warnings are printed below, once: not also as log lines.
    logging.getLogger("fedhaven.datacheck").setLevel(logging.ERROR)
    source = f"data file '{file}'"
    checked = check_site(
        fdata.read_table(str(file)), cfg.data, rules, seed=cfg.train.seed, source=source
    )
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


models_app = typer.Typer(no_args_is_help=True, help="Models prepared for offline use.")
app.add_typer(models_app, name="models")


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="digits-resnet | smollm2")],
) -> None:
    """Build a bundled model once into the cache (FEDHAVEN_CACHE) and print its directory."""
    from fedhaven.tasks.causal_lm import SMOLLM2, prepare_smollm2
    from fedhaven.tasks.image_cls import DIGITS_RESNET, prepare_digits_resnet

    prepare = {DIGITS_RESNET: prepare_digits_resnet, SMOLLM2: prepare_smollm2}
    if name not in prepare:
        raise FedhavenError(f"unknown model {name!r}: use one of {', '.join(prepare)}")
    console.print(str(prepare[name]()), highlight=False, soft_wrap=True)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        app()
    except FedhavenError as e:
        err.print(f"error: {e}", highlight=False, soft_wrap=True, markup=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
