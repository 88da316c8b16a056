"""A run explains itself: ``report.md`` and PNG plots in the run directory, from its
``summary.json`` and ``metrics.jsonl`` (written at the end of every run; ``fedhaven report
RUN_DIR`` writes them again).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a site's server or in CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import precision_recall_fscore_support

from fedhaven.config import keys
from fedhaven.errors import FedhavenError
from fedhaven.run_record import (
    ADAPTER_DIR,
    BEST_ROUND,
    CENTRAL_DP,
    CENTRAL_EPSILON,
    CLIPPING_NORM,
    CONFIG,
    CONFUSION,
    CONFUSION_PLOT,
    DATA_CHECKS,
    DELTA,
    DP_MODE,
    ENGINE,
    EPSILON,
    EPSILON_PLOT,
    EXAMPLES,
    FINGERPRINT,
    GLOBAL,
    GLOBAL_PLOT,
    LABELS,
    LAST_ROUND,
    MAX_EPSILON,
    METRICS,
    METRICS_FILE,
    MODEL_CARD_FILE,
    NOISE_MULTIPLIER,
    PER_CLASS_F1,
    PLOTS_DIR,
    RELEASES,
    REPORT_FILE,
    ROUND,
    ROUNDS,
    ROWS,
    ROWS_IN,
    SIMULATED_UPDATE_SCALE,
    SITES,
    SITES_PLOT,
    SUMMARY_FILE,
    VERSIONS,
    WALL_S,
    never_predicted,
)


def _read(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary_file, metrics_file = run_dir / SUMMARY_FILE, run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise FedhavenError(f"run directory '{run_dir}' not found: pass a run directory")
    for f in (summary_file, metrics_file):
        if not f.is_file():
            raise FedhavenError(
                f"'{run_dir}' has no {f.name}: pass a run directory of a finished run"
            )
    summary = json.loads(summary_file.read_text())
    rounds = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    return summary, rounds


def _site_names(rounds: list[dict[str, Any]]) -> dict[str, str]:
    """Flower's node ids are long random numbers: number the sites 1..N in a stable order."""
    nodes = sorted({node for r in rounds for node in r[SITES]}, key=int)
    return {node: f"site {i}" for i, node in enumerate(nodes, start=1)}


def per_class(confusion: list[list[int]], labels: list[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows: truth)."""
    cm = np.asarray(confusion)
    k = np.arange(len(labels))
    # the matrix is the multiset of (truth, prediction) pairs: expand it for scikit-learn
    y_true = np.repeat(np.repeat(k, len(k)), cm.ravel())
    y_pred = np.repeat(np.tile(k, len(k)), cm.ravel())
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=k, average=None, zero_division=0
    )
    return [
        {"label": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
         "support": int(s[i])}
        for i, name in enumerate(labels)
    ]  # fmt: skip


#: What runs written before tasks existed (text classification) evaluated.
_CLASSIFICATION_METRICS = ["loss", "accuracy", "macro_f1"]
_TASK_NAMES = {
    "seq-cls": "text classification",
    "image-cls": "image classification",
    "causal-lm": "instruction tuning (causal LM)",
}


def _metrics(summary: dict[str, Any]) -> list[str]:
    return summary.get(METRICS, _CLASSIFICATION_METRICS)


def _scores(summary: dict[str, Any]) -> list[str]:
    """The metrics in [0, 1] (plotted and tabled per site): all but loss and perplexity."""
    return [m for m in _metrics(summary) if m not in ("loss", "perplexity")]


def _title(metric: str) -> str:
    return {"macro_f1": "macro-F1", "token_f1": "token-F1"}.get(metric, metric.replace("_", " "))


def _plot_global(rounds: list[dict[str, Any]], scores: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r[ROUND] for r in rounds]
    for key in scores:
        ax.plot(x, [r[GLOBAL][key] for r in rounds], marker="o", label=key.replace("_", "-"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="held-out set", ylim=(0, 1), title="global model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_sites(
    rounds: list[dict[str, Any]], names: dict[str, str], scores: list[str], path: Path
) -> None:
    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores), 3.5), sharey=True)
    for ax, key in zip(np.atleast_1d(axes), scores, strict=True):
        for node, name in names.items():
            pts = [
                (r[ROUND], r[SITES][node][key])
                for r in rounds
                if node in r[SITES] and r[SITES][node][key] is not None
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="round", title=f"site validation {_title(key)}", ylim=(0, 1))
    np.atleast_1d(axes)[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_epsilon(rounds: list[dict[str, Any]], names: dict[str, str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for node, name in names.items():
        pts = [
            (r[ROUND], r[SITES][node][EPSILON])
            for r in rounds
            if node in r[SITES] and r[SITES][node][EPSILON] is not None
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{name} (record-level)")
    central = [(r[ROUND], r[CENTRAL_EPSILON]) for r in rounds if r.get(CENTRAL_EPSILON)]
    if central:
        ax.plot(*zip(*central, strict=True), "k--", marker="s", label="central (site-level)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="cumulative ε", title="privacy spent")
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no DP in this run", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_confusion(confusion: list[list[int]], labels: list[str], path: Path) -> None:
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set(xlabel="predicted", ylabel="true", title="held-out confusion (final model)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _final(g: dict[str, Any], metrics: list[str]) -> str:
    """``Accuracy 0.812, macro-F1 0.640, loss 0.512.``: the final model's metrics."""
    text = ", ".join(f"{_title(m)} {g[m]:.3f}" for m in metrics)
    return text[0].upper() + text[1:] + "."


def _hostile(summary: dict[str, Any]) -> list[str]:
    """A warning that the run is a robustness experiment, not a clean federation: some
    simulated sites scaled their updates (``--site-update-scale``)."""
    scaled = summary.get(SIMULATED_UPDATE_SCALE)
    if not scaled:
        return []
    which = ", ".join(
        f"partition {i} ×{s:g}" for i, s in sorted(scaled.items(), key=lambda x: int(x[0]))
    )
    return [
        f"> **Hostile-site simulation**: these sites' updates were scaled before sending "
        f"({which}). Not a clean run.",
        "",
    ]


def _never_predicted(summary: dict[str, Any]) -> list[str]:
    """A warning that the final model ignores some classes: a collapse its overall accuracy
    can hide. From the confusion matrix, so runs written before the summary key get it too."""
    g = summary[GLOBAL]
    missing = never_predicted(g[CONFUSION], summary[LABELS]) if CONFUSION in g else []
    if not missing:
        return []
    return [
        f"> **Warning:** the final model never predicts: {', '.join(missing)} (on the held-out "
        "set). Such a class is usually rare at the sites or drowned by DP noise: try "
        "`train.logit-adjustment`, more rounds, or a larger privacy budget (`privacy.epsilon`).",
        "",
    ]


def _image(name: str, plot: str) -> str:
    return f"![{name}]({PLOTS_DIR}/{plot})"


def _privacy(summary: dict[str, Any]) -> list[str]:
    """The report's privacy section: record-level DP at the sites, central DP."""
    cfg, central = summary[CONFIG], summary.get(CENTRAL_DP)
    return [
        "## Privacy",
        "",
        (
            f"- Record-level DP at each site (DP-SGD, {cfg['privacy.accountant']} accountant): "
            f"max ε = {summary[MAX_EPSILON]:.2f} at δ = {summary[DELTA]:g} "
            f"(target ε = {cfg['privacy.epsilon']:g})."
            if summary[MAX_EPSILON] is not None
            else "- No record-level DP: the sites trained without noise."
        ),
        (
            f"- Central DP ({central[DP_MODE]}, noise multiplier {central[NOISE_MULTIPLIER]:g}"
            f", clip {central[CLIPPING_NORM]:.3g}): site-level ε = {central[EPSILON]:.2f} "
            f"at δ = {central[DELTA]:g} over {central[RELEASES]} released rounds."
            if central
            else "- No central DP."
        ),
        "",
    ]


def _rounds_table(summary: dict[str, Any], rounds: list[dict[str, Any]]) -> list[str]:
    """One row a round: the global model's metrics (scores first), ε, and the aggregation."""
    metrics, scores = _metrics(summary), _scores(summary)
    columns = [*scores, *(m for m in metrics if m not in scores)]
    lines = [
        "## Rounds",
        "",
        "| round | wall s | "
        + " | ".join(_title(m) for m in columns)
        + " | max site ε | central ε | sites used | rejected | bytes received "
        "| update norm, median / max |",
        "|---|---|" + "---|" * len(metrics) + "---|---|---|---|---|---|",
    ]
    for r in rounds:
        values = [r[GLOBAL][m] for m in columns]
        lines.append(
            f"| {r[ROUND]} | {r[WALL_S]:.1f} | "
            + " | ".join(f"{v:.3f}" for v in values)
            + f" | {_fmt(r[MAX_EPSILON], 2)} | {_fmt(r.get(CENTRAL_EPSILON), 2)} "
            f"| {r.get('sites_used', '-')} | {r.get('rejected', '-')} "
            f"| {r.get('bytes_received', '-')} "
            f"| {_fmt(r.get('update_norm_median'), 3)} / {_fmt(r.get('update_norm_max'), 3)} |"
        )
    return lines


def _sites_table(summary: dict[str, Any], names: dict[str, str]) -> list[str]:
    """One row a site: its latest round's validation scores and ε."""
    scores = _scores(summary)
    lines = [
        "## Sites",
        "",
        "| site | node | examples | "
        + " | ".join(f"val {_title(m)}" for m in scores)
        + " | ε | last round |",
        "|---|---|---|" + "---|" * len(scores) + "---|---|",
    ]
    for node, name in names.items():
        s = summary[SITES].get(node)
        if s is None:
            continue
        lines.append(
            f"| {name} | {node} | {s[EXAMPLES]} | "
            + " | ".join(_fmt(s.get(m)) for m in scores)
            + f" | {_fmt(s[EPSILON], 2)} | {s[LAST_ROUND]} |"
        )
    return lines


def _classes_table(g: dict[str, Any], labels: list[str]) -> list[str]:
    """Precision, recall, F1 and support per class of the final model (classification)."""
    missing = set(never_predicted(g[CONFUSION], labels))
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for c in per_class(g[CONFUSION], labels):
        mark = " **(never predicted)**" if c["label"] in missing else ""
        lines.append(
            f"| {c['label']}{mark} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} "
            f"| {c['support']} |"
        )
    return [*lines, "", _image("confusion", CONFUSION_PLOT), ""]


def _markdown(summary: dict[str, Any], rounds: list[dict[str, Any]], names: dict[str, str]) -> str:
    cfg, g, labels = summary[CONFIG], summary[GLOBAL], summary[LABELS]
    task = _TASK_NAMES[cfg.get(keys.MODEL_TASK, "seq-cls")]
    lines = [
        "# Run report",
        "",
        f"{summary[ROUNDS]} rounds, {len(names)} sites ({summary.get(ENGINE, '?')}), "
        f"{task}, model `{cfg['model.path']}` + LoRA r={cfg['lora.r']}"
        + (f", labels {', '.join(labels)}" if labels else "")
        + f". Wall time {summary[WALL_S]:.0f} s.",
        "",
        *_hostile(summary),
        *_never_predicted(summary),
        *_privacy(summary),
        *_rounds_table(summary, rounds),
        "",
        _image("global", GLOBAL_PLOT),
        "",
        *_sites_table(summary, names),
        "",
        _image("sites", SITES_PLOT),
        "",
        _image("epsilon", EPSILON_PLOT),
        "",
        "## Final model on the held-out set",
        "",
        _final(g, _metrics(summary)),
        "",
        *(_classes_table(g, labels) if CONFUSION in g else []),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in summary[VERSIONS].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _count(value: Any) -> str:
    return "-" if value is None else str(int(value))


def _data_table(sites: dict[str, Any], names: dict[str, str]) -> list[str]:
    """Each site's rows and fingerprint; where sites checked their own files
    (fedhaven.datacheck), what the checks found, as totals."""
    checked = any(s.get(ROWS_IN) is not None for s in sites.values())
    head = "| site | training rows | rows in all | data fingerprint |"
    if checked:
        head += " rows in file | dropped | duplicates removed | classes under minimum |"
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    for node, name in names.items():
        s = sites[node]
        fp = s.get(FINGERPRINT)
        line = (
            f"| {name} | {s[EXAMPLES]} | {s.get(ROWS, '-')} "
            f"| {'-' if fp is None else f'{int(fp):012x}'} |"
        )
        if checked:
            line += " " + " | ".join(_count(s.get(k)) for k in DATA_CHECKS)
            line += " |"
        lines.append(line)
    if checked:
        lines += [
            "",
            "Rows in file: before the site's checks; dropped: empty texts, labels outside the "
            "run's set (or case variants, as the site's label rule says), conflicting labels "
            "and duplicates; classes under minimum: the run's classes with fewer rows than the "
            "site's min-per-class.",
        ]
    return lines


def model_card(summary: dict[str, Any]) -> str:
    """The adapter's model card, from the run's summary: what was trained, on what (counts
    and fingerprints the sites computed, never content), at what privacy cost, how well."""
    cfg, g, labels = summary[CONFIG], summary[GLOBAL], summary[LABELS]
    central = summary.get(CENTRAL_DP)
    sites = summary[SITES]
    task = cfg.get(keys.MODEL_TASK, "seq-cls")
    # a summary written before model.head-init existed started from nn.Linear's init
    head = "linear head"
    if cfg.get(keys.MODEL_HEAD_INIT) == "labels":
        head += f" started from the label names' embeddings, '{cfg[keys.MODEL_LABEL_PROMPT]}'"
    what = {
        "seq-cls": f"text classification into {', '.join(labels or [])} "
        f"({cfg['model.pooling']} pooling + {head})",
        "image-cls": f"image classification into {', '.join(labels or [])}",
        "causal-lm": "instruction tuning of a causal LM (loss on the response tokens)",
    }[task]
    strategy = cfg.get(keys.FEDERATION_STRATEGY, "fedavg")
    rule = f"`{strategy}`"
    momentum = cfg.get(keys.FEDERATION_SERVER_MOMENTUM)  # absent in older runs' configs
    if strategy == "fedavg" and momentum:  # the other rules ignore it
        rule += f" with server momentum {momentum}"
    names = {node: f"site {i}" for i, node in enumerate(sorted(sites, key=int), start=1)}
    lines = [
        "# Model card",
        "",
        *_hostile(summary),
        *_never_predicted(summary),
        "## Model",
        "",
        f"- Base model: `{cfg['model.path']}`; task `{task}`: {what}.",
        f"- Adapter: LoRA r={cfg['lora.r']}, alpha={cfg['lora.alpha']}, dropout "
        f"{cfg['lora.dropout']}, on `{cfg['lora.target-modules']}` of layers "
        f"`{cfg['lora.layers'] or 'all'}`; trained in full: `{cfg['lora.modules-to-save']}`.",
        f"- Training: federated, strategy {rule}, "
        f"{summary[ROUNDS]} rounds (best round: {summary.get(BEST_ROUND, summary[ROUNDS])}"
        f"), {len(sites)} sites, {summary.get(ENGINE, '?')}.",
        "",
        "## Data (counts and fingerprints computed at each site; no content left a site)",
        "",
        *_data_table(sites, names),
    ]
    lines += ["", "## Privacy", ""]
    if summary[MAX_EPSILON] is not None:
        lines += [
            f"- Record-level differential privacy at each site: DP-SGD (Opacus, Gaussian "
            f"mechanism, per-example clipping at {cfg['privacy.max-grad-norm']}, Poisson "
            f"sampling), {cfg['privacy.accountant'].upper()} accountant over each site's "
            f"whole history. δ = {summary[DELTA]:g}.",
            "",
            "| site | ε spent (cumulative, this and earlier runs on its ledger) |",
            "|---|---|",
            *(f"| {names[n]} | {_fmt(sites[n][EPSILON], 2)} |" for n in names),
        ]
    else:
        lines.append("- No record-level differential privacy: the sites trained without noise.")
    if central:
        lines.append("")
        lines.append(
            f"- Site-level central DP ({central[DP_MODE]}): ε = {central[EPSILON]:.2f} at "
            f"δ = {central[DELTA]:g} over {central[RELEASES]} releases (Flower's RDP "
            "accountant)."
        )
    lines += [
        "",
        "## Evaluation (held-out set, final model)",
        "",
        _final(g, _metrics(summary))
        + (
            " Per class F1: "
            + ", ".join(f"{n} {f:.2f}" for n, f in zip(labels, g[PER_CLASS_F1], strict=True))
            + "."
            if PER_CLASS_F1 in g
            else ""
        ),
        "",
        "## Software",
        "",
        ", ".join(f"{k} {v}" for k, v in summary[VERSIONS].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and ``plots/*.png`` into ``run_dir``; returns the report's path."""
    d = Path(run_dir)
    summary, rounds = _read(d)
    names = _site_names(rounds)
    plots = d / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    _plot_global(rounds, _scores(summary), plots / GLOBAL_PLOT)
    _plot_sites(rounds, names, _scores(summary), plots / SITES_PLOT)
    _plot_epsilon(rounds, names, plots / EPSILON_PLOT)
    if CONFUSION in summary[GLOBAL]:
        _plot_confusion(summary[GLOBAL][CONFUSION], summary[LABELS], plots / CONFUSION_PLOT)
    report = d / REPORT_FILE
    report.write_text(_markdown(summary, rounds, names))
    if (d / ADAPTER_DIR).is_dir():
        (d / ADAPTER_DIR / MODEL_CARD_FILE).write_text(model_card(summary))
    return report
