"""Hyperparameter search: simulated federations under Optuna, at a fixed per-site ε.

Each trial is one :func:`fedhaven.simulations.simulate` run (``<out>/trial-<n>``) with
sampled learning rates, LoRA rank, local steps and clip norm on top of a base flat config.
The objective is the federated *validation* macro-F1 of the last round (the sites' own
validation splits, example-weighted), never the held-out test set: choosing a config by its
test score would make that score optimistic. The study lives in SQLite, so running again
with the same storage and study name adds trials to it. The best config is written as a
TOML file that ``fedhaven simulate --config`` reads.

Privacy note: every trial spends its sites' ε on the same data, and the choice of the best
trial is itself a release; the ε reported for a run does not cover the search.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedhaven.config import Config, Scalar, from_flat, keys
from fedhaven.errors import FedhavenError
from fedhaven.run_record import METRICS_FILE, SITES, validation_score
from fedhaven.simulations import preflight, simulate

log = logging.getLogger(__name__)

BEST_FILE = "best.toml"
STORAGE_FILE = "study.db"
#: Study user attribute holding the canonical base config the study's trials ran on.
BASE_ATTR = "base"
#: LoRA's update is scaled by alpha / r: tying alpha = 2·r keeps that scale fixed, so the rank
#: changes capacity only and the step size is the learning rate's job (searched separately).
ALPHA_PER_RANK = 2

#: Samples one trial's flat overrides (sampled and derived keys) from an Optuna trial.
Space = Callable[[optuna.Trial], dict[str, Scalar]]
#: Called once per finished trial with its row (see :func:`_row`).
TrialProgressFn = Callable[[dict[str, Any]], None]


def default_space(trial: optuna.Trial) -> dict[str, Scalar]:
    """The default search space; ``lora.alpha`` is derived (``ALPHA_PER_RANK`` · r)."""
    lr, lora_lr = keys.TRAIN_LEARNING_RATE, keys.TRAIN_LORA_LEARNING_RATE
    steps, clip = keys.TRAIN_LOCAL_STEPS, keys.PRIVACY_MAX_GRAD_NORM
    r = trial.suggest_categorical(keys.LORA_R, [4, 8, 16])
    return {
        lr: trial.suggest_float(lr, 0.05, 1.0, log=True),
        lora_lr: trial.suggest_float(lora_lr, 1e-4, 1e-2, log=True),
        keys.LORA_R: r,
        keys.LORA_ALPHA: ALPHA_PER_RANK * r,
        steps: trial.suggest_int(steps, 1, 4),
        clip: trial.suggest_float(clip, 0.1, 5.0, log=True),
    }


def validation_macro_f1(run_dir: Path, metric: str = "macro_f1") -> float | None:
    """The last round's site-validation macro-F1 (or the task's primary ``metric``), weighted
    by each site's validation examples. ``None`` when no site reported it in that round.
    """
    path = Path(run_dir) / METRICS_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    if not lines:
        return None
    return validation_score(json.loads(lines[-1])[SITES], metric)


def _canonical(base: Mapping[str, Any], cfg: Config) -> dict[str, Scalar]:
    """``base``'s keys with ``cfg``'s typed values (``--set`` gives strings), minus the run
    dir: what the study compares and ``best.toml`` holds."""
    typed = cfg.to_flat()
    return {k: typed[k] for k in base if k != keys.FEDERATION_OUT_DIR}


def _check_base(cfg: Config) -> None:
    # Without validation splits there is nothing to tune on but the test set.
    if cfg.data.val_fraction <= 0:
        raise FedhavenError(
            "config 'data.val-fraction' = 0 leaves no validation split to tune on: set it > 0"
        )
    if cfg.federation.fraction_evaluate <= 0:
        raise FedhavenError(
            "config 'federation.fraction-evaluate' = 0 evaluates no site, so there is no "
            "validation score to tune on: set it > 0"
        )


def _open_study(storage: Path, study_name: str, base: dict[str, Scalar]) -> optuna.Study:
    try:
        storage.parent.mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            direction="maximize",
            storage=f"sqlite:///{storage}",
            study_name=study_name,
            load_if_exists=True,
        )
    except (OSError, sqlalchemy.exc.SQLAlchemyError) as e:
        reason = str(e).splitlines()[0]
        raise FedhavenError(
            f"cannot open the study storage '{storage}' ({reason}): pass a writable --storage "
            "FILE (an SQLite database, created if missing)"
        ) from e
    stored = study.user_attrs.get(BASE_ATTR)
    if stored is None:
        study.set_user_attr(BASE_ATTR, base)
    elif stored != base:
        # Scores from different bases (data, rounds, ε) are not comparable.
        key = min(k for k in stored.keys() | base.keys() if stored.get(k) != base.get(k))
        raise FedhavenError(
            f"study '{study_name}' in '{storage}' was run with another base config (it differs "
            f"in '{key}'): use the same --config/--set to resume, or a new --study name"
        )
    return study


def _row(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value if trial.state == TrialState.COMPLETE else None,
        "params": dict(trial.params),
        "test_macro_f1": trial.user_attrs.get("test_macro_f1"),
        "run_dir": trial.user_attrs.get("run_dir"),
        "error": trial.user_attrs.get("error"),
    }


def _progress_bar(show: bool) -> Progress:
    """Trials done and the current trial's rounds, live on a terminal; transient, so what
    stays on screen is the caller's per-trial lines."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(*columns, TimeElapsedColumn(), transient=True, disable=not show)


def _toml_value(v: Scalar) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)  # repr gives inf / nan / 1e-05, all valid TOML
    # a JSON string is a TOML basic string, except that TOML forbids a raw DEL
    return json.dumps(v).replace("\x7f", "\\u007F")


def write_config(path: Path, flat: Mapping[str, Scalar], header: list[str]) -> None:
    """``flat`` as one TOML table per config section, readable by ``load_toml``."""
    sections: dict[str, list[str]] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        sections.setdefault(section, []).append(f"{name} = {_toml_value(value)}")
    text = "".join(f"# {line}\n" for line in header)
    for section in dict.fromkeys(k.partition(".")[0] for k in Config().to_flat()):
        if section in sections:  # in the config's own order
            text += f"\n[{section}]\n" + "\n".join(sections[section]) + "\n"
    path.write_text(text)


def tune(
    base: Mapping[str, Any],
    trials: int,
    *,
    out: Path,
    storage: Path | None = None,
    study_name: str = "fedhaven",
    seed: int = 0,
    space: Space = default_space,
    progress: TrialProgressFn | None = None,
    verbose: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run ``trials`` more trials of the study and write ``<out>/best.toml``.

    ``base`` is a flat run config; each trial runs it with ``space``'s overrides in
    ``<out>/trial-<n>``. A :class:`FedhavenError` from a trial (a bad base config) ends the
    search; any other error fails that trial only. Returns the best value and params, the
    best config's path, the number of complete trials, the study, its storage and every
    trial's row (``history``). ``show_progress``: a progress bar of the trials and of the
    current trial's rounds (a trial is a whole federation: minutes on a CPU).
    """
    if trials < 1:
        raise FedhavenError(f"--trials {trials} runs nothing: give at least 1")
    cfg = from_flat(base)
    canonical = _canonical(base, cfg)
    _check_base(cfg)

    preflight(cfg)  # a bad data or model path fails here, before any file is written
    out = Path(out).absolute()
    storage = Path(storage).absolute() if storage else out / STORAGE_FILE
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    bar = _progress_bar(show_progress)
    trials_bar = bar.add_task("trials", total=trials)
    try:
        bar.start()
        study = _open_study(storage, study_name, canonical)
        # A fixed seed would replay the first run's random start-up points on resume:
        # offset it by the trials already in the study.
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
        for _ in range(trials):
            number = _run_trial(study, cfg, out, space, bar, verbose)
            bar.advance(trials_bar)
            if progress:
                progress(_row(study.trials[number]))
    finally:
        bar.stop()
        optuna.logging.set_verbosity(level)
    return _finish(study, study_name, storage, out / BEST_FILE, canonical)


def _run_trial(
    study: optuna.Study, cfg: Config, out: Path, space: Space, bar: Progress, verbose: bool
) -> int:
    """Ask the study for one trial, run its federation in ``<out>/trial-<n>`` and tell the
    study its score; returns the trial's number."""
    trial = study.ask()
    run_dir = out / f"trial-{trial.number}"
    trial.set_user_attr("run_dir", str(run_dir))
    rounds_bar = bar.add_task(f"trial {trial.number}: rounds", total=cfg.federation.rounds)
    try:
        overrides = space(trial)
        trial_cfg = cfg.replace(**overrides, **{keys.FEDERATION_OUT_DIR: str(run_dir)})
        bar.update(rounds_bar, total=trial_cfg.federation.rounds)
        summary = simulate(
            trial_cfg,
            verbose=verbose,
            progress=lambda line: bar.update(rounds_bar, completed=line["round"]),
        )
        metric = summary.get("primary_metric", "macro_f1")
        trial.set_user_attr("test_macro_f1", summary["global"][metric])
        value = validation_macro_f1(run_dir, metric)
        if value is None or not math.isfinite(value):
            raise RuntimeError("no site reported a validation macro-F1 in the last round")
    except (FedhavenError, KeyboardInterrupt):
        # the base config is wrong (or the user stopped): no later trial can do better
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as e:  # a broken trial is the search's business, not the user's
        log.warning("trial %d failed: %r", trial.number, e, exc_info=verbose)
        trial.set_user_attr("error", repr(e))
        study.tell(trial, state=TrialState.FAIL)
    else:
        trial.set_user_attr("overrides", overrides)
        study.tell(trial, value)
    bar.remove_task(rounds_bar)
    return trial.number


def _finish(
    study: optuna.Study,
    study_name: str,
    storage: Path,
    best_path: Path,
    canonical: dict[str, Scalar],
) -> dict[str, Any]:
    """Write the best trial's config to ``best_path``; the search's result."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise FedhavenError(
            f"no trial of study '{study_name}' completed (see the warnings above): fix the "
            "cause and run again; the study resumes"
        )
    best = study.best_trial
    write_config(
        best_path,
        {**canonical, **best.user_attrs["overrides"]},
        [
            f"fedhaven tune: best of {len(done)} complete trials, study '{study_name}' "
            f"({storage}), trial {best.number}",
            f"validation macro-F1 {best.value:.4f} (sites, last round, example-weighted); "
            f"held-out macro-F1 {best.user_attrs.get('test_macro_f1', float('nan')):.4f}",
            f"run it: fedhaven simulate --config {best_path}",
        ],
    )
    return {
        "best_value": best.value,
        "best_params": dict(best.params),
        "best_config_path": str(best_path),
        "trials": len(done),
        "study": study_name,
        "storage": str(storage),
        "history": [_row(t) for t in study.trials],
    }
