"""``fedhaven`` command line. User errors print one line and exit 2, without a traceback."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fedhaven import run_record as rr
from fedhaven.cli import deploy, flags, sites
from fedhaven.cli.common import console, err, fmt, quiet_libraries
from fedhaven.config import keys
from fedhaven.errors import FedhavenError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False
)


@app.callback()
def _root() -> None:
    """Federated, differentially private LoRA fine-tuning on Flower."""


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
    central = line[rr.CENTRAL_EPSILON]
    console.print(
        f"round {line[rr.ROUND]:>3}  {line[rr.WALL_S]:7.1f}s  {_scores(line[rr.GLOBAL])}  "
        f"max site ε {fmt(line[rr.MAX_EPSILON], 2)}"
        + ("" if central is None else f"  central ε {central:.2f}")
    )


def _summary_table(summary: dict[str, Any]) -> None:
    g = summary[rr.GLOBAL]
    console.print(
        f"\n[bold]global[/bold] (held-out set): {_scores(g)}"
        + (
            "  per-class F1 "
            + ", ".join(
                f"{n} {f:.2f}" for n, f in zip(summary[rr.LABELS], g[rr.PER_CLASS_F1], strict=True)
            )
            if rr.PER_CLASS_F1 in g
            else ""
        )
    )
    if missing := summary.get(rr.NEVER_PREDICTED):
        console.print(
            f"[yellow]warning:[/yellow] the final model never predicts {', '.join(missing)} "
            "(see report.md)"
        )
    scores = [m for m in summary.get(rr.METRICS, ["accuracy", "macro_f1"]) if m != "loss"]
    table = Table(title="sites")
    for col in ("site", "examples", *(f"val {_NAMES.get(m, m)}" for m in scores), "ε"):
        table.add_column(col, justify="right")
    for i, (node, s) in enumerate(sorted(summary[rr.SITES].items()), start=1):
        table.add_row(
            f"{i} ({node})",
            str(s[rr.EXAMPLES]),
            *(fmt(s.get(m)) for m in scores),
            fmt(s[rr.EPSILON], 2),
        )
    console.print(table)
    delta = summary[rr.DELTA]
    console.print(
        f"rounds {summary[rr.ROUNDS]}  wall {summary[rr.WALL_S]:.0f}s  "
        f"{summary[rr.BYTES_PER_SITE_ROUND] / 1e6:.2f} MB per site per round "
        f"(full model {summary[rr.FULL_MODEL_BYTES] / 1e6:.3g} MB)  "
        + (f"δ {delta:g}  " if delta else "no DP  ")
        + (
            f"central DP ({central[rr.DP_MODE]}): site-level ε {central[rr.EPSILON]:.2f}  "
            if (central := summary[rr.CENTRAL_DP])
            else ""
        )
        + f"→ {summary[rr.RUN_DIR]}"
    )


@app.command()
def simulate(
    rounds: flags.Rounds = None,
    sites: flags.Sites = None,
    data: flags.Data = None,
    test: flags.Test = None,
    text_column: flags.TextColumn = None,
    label_column: flags.LabelColumn = None,
    labels: flags.Labels = None,
    partition: flags.Partition = None,
    epsilon: flags.Epsilon = None,
    no_dp: flags.NoDp = False,
    model: flags.Model = None,
    lora_r: flags.LoraR = None,
    seed: flags.Seed = None,
    out: flags.Out = None,
    site_budget: flags.SiteBudget = None,
    site_state: flags.SiteState = None,
    site_rank: flags.SiteRank = None,
    site_update_scale: flags.SiteUpdateScale = None,
    config: flags.ConfigFile = None,
    set_: flags.Sets = None,
    preset: flags.Preset = None,
    task: flags.Task = None,
    resume: flags.Resume = False,
    ray_address: flags.RayAddress = None,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's logs")] = False,
) -> None:
    """Run N simulated sites on this machine (or a Ray cluster) with Flower's simulation
    engine."""
    from fedhaven.config import from_flat
    from fedhaven.presets import preset as preset_overrides

    flat = preset_overrides(preset) if preset else {}
    flat |= flags.given(config, set_)
    flat |= flags.run_flags(
        rounds=rounds,
        sites=sites,
        data=data,
        test=test,
        text_column=text_column,
        label_column=label_column,
        labels=labels,
        partition=partition,
        epsilon=epsilon,
        no_dp=no_dp,
        model=model,
        task=task,
        lora_r=lora_r,
        seed=seed,
        out=out,
        resume=resume,
    )
    own = flags.take_sites(
        flat, budget=site_budget, state=site_state, rank=site_rank, update_scale=site_update_scale
    )
    cfg = from_flat(flat)  # validate before the heavy imports and anything else starts
    from fedhaven.simulations import simulate as run

    if not verbose:
        quiet_libraries()
    summary = run(cfg, progress=_progress, verbose=verbose, sites=own, ray_address=ray_address)
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


app.add_typer(sites.ledger_app, name="ledger")
app.add_typer(deploy.certs_app, name="certs")
app.command("coordinator")(deploy.coordinator_cmd)
app.command("site")(deploy.site_cmd)


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
    config: flags.ConfigFile = None,
    set_: flags.Sets = None,
    seed: Annotated[int, typer.Option(help="seed of the sampler (train.seed is a --set key)")] = 0,
    verbose: Annotated[bool, typer.Option(help="show Optuna's, Flower's and Ray's logs")] = False,
) -> None:
    """Search learning rates, LoRA rank, local steps and clip norm at a fixed ε (Optuna).

    Each trial is a simulated federation; the score is the sites' validation macro-F1 in the
    last round (never the held-out set). Writes OUT/best.toml for `simulate --config`.
    """
    from fedhaven.config import from_flat

    if trials < 1:
        raise FedhavenError(f"--trials {trials} runs nothing: give at least 1")
    flat = flags.given(config, set_)
    from_flat(flat)  # validate before the heavy imports and anything else starts
    from fedhaven.simulations.tune import tune as run

    if not verbose:
        quiet_libraries()
    result = run(
        flat,
        trials,
        out=out,
        storage=storage,
        study_name=study,
        seed=seed,
        progress=_trial_line,
        verbose=verbose,
    )
    _study_table(result)
    console.print(
        f"best val macro-F1 {result['best_value']:.3f} of {result['trials']} complete trials "
        f"→ {result['best_config_path']}  (fedhaven simulate --config FILE)",
        highlight=False,
        soft_wrap=True,
    )


def _trial_score(row: dict[str, Any]) -> str:
    return fmt(row["value"]) if row["state"] == "COMPLETE" else row["state"].lower()


def _trial_line(row: dict[str, Any]) -> None:
    params = "  ".join(f"{k} {v:.3g}" for k, v in row["params"].items())
    console.print(
        f"trial {row['number']:>3}  val macro-F1 {_trial_score(row)}  {params}",
        highlight=False,
        soft_wrap=True,
    )


#: Short headers of the searched keys: they keep the study's table within 80 columns.
_SHORT = {
    keys.TRAIN_LEARNING_RATE: "lr",
    keys.TRAIN_LORA_LEARNING_RATE: "LoRA lr",
    keys.LORA_R: "r",
    keys.TRAIN_LOCAL_STEPS: "steps",
    keys.PRIVACY_MAX_GRAD_NORM: "clip",
}


def _study_table(result: dict[str, Any]) -> None:
    """Every trial of the study: its scores and the values it tried."""
    params = list(dict.fromkeys(k for row in result["history"] for k in row["params"]))
    table = Table(title=f"study {result['study']} ({result['storage']})")
    for col in ("trial", "val F1", "test F1", *(_SHORT.get(k, k) for k in params)):
        table.add_column(col, justify="right")
    for row in result["history"]:
        table.add_row(
            str(row["number"]),
            _trial_score(row),
            fmt(row["test_macro_f1"]),
            *(f"{row['params'][k]:.3g}" if k in row["params"] else "-" for k in params),
        )
    console.print(table)


app.add_typer(sites.data_app, name="data")
models_app = typer.Typer(no_args_is_help=True, help="Models prepared for offline use.")
app.add_typer(models_app, name="models")


@models_app.command("prepare")
def models_prepare(
    name: Annotated[str, typer.Argument(help="digits-resnet | smollm2")],
) -> None:
    """Build a bundled model once into the cache (FEDHAVEN_CACHE) and print its directory."""
    from fedhaven.tasks.causal_lm import SMOLLM2, prepare_smollm2
    from fedhaven.tasks.digits_resnet import DIGITS_RESNET, prepare_digits_resnet

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
