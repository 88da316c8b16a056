"""One table of user mistakes, each refused the same way (DESIGN.md, rule 7).

Every command-line row runs the real ``fedhaven`` entry point in this process and must exit
non-zero with exactly one non-empty output line on stderr that names the problem and its fix,
no traceback, and every file the user gave byte-identical afterwards. A site's reply is no
command line: its rows are refused by the coordinator's validation in one line. Each row
fails in validation, before any training or Ray start.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from PIL import Image

from fedhaven import protocol
from fedhaven.cli import main
from fedhaven.config import Config
from fedhaven.deploy.certs import init_ca, site_keys
from fedhaven.errors import FedhavenError
from fedhaven.models import build_model, save_trained
from fedhaven.strategies import FedAvg

# Flower 1.42 reads the run, node and task ids when a Message is built (the reply rows).
pytestmark = pytest.mark.usefixtures("flower_identity")


@dataclass(frozen=True)
class Inputs:
    """Valid inputs, built once; a row copies into its own directory what it spoils."""

    model: Path
    vit: Path
    csv: Path
    test_csv: Path
    adapter: Path
    pki: Path
    site_key: Path

    def watched(self) -> list[Path]:
        """What the rows read in place: it must not change either."""
        return [self.model, self.vit, self.csv, self.test_csv, self.adapter, self.pki]


@dataclass(frozen=True)
class Case:
    id: str
    #: the command line, given the row's directory (which it fills with its inputs); or, for
    #: a reply row, a call that makes the coordinator refuse the reply
    make: Callable[[Path, Inputs], list[str] | Callable[[], None]]
    fragment: str  # the error line names the problem and the fix; "{tmp}": the row's dir


# ------------------------------------------------------------------ building bad inputs


def _copy(src: Path, tmp: Path, name: str | None = None) -> Path:
    dst = tmp / (name or src.name)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copyfile(src, dst)
    return dst


def _write(tmp: Path, name: str, content: str | bytes) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


def _simulate(tmp: Path, x: Inputs, *args: str) -> list[str]:
    """``fedhaven simulate`` on valid data and model, plus the row's own ``args``."""
    base = ["--model", str(x.model), "--data", str(x.csv), "--test", str(x.test_csv)]
    return ["simulate", *base, "--rounds", "1", "--out", str(tmp / "run"), *args]


def _config(tmp: Path, x: Inputs, toml: str) -> list[str]:
    return _simulate(tmp, x, "--config", str(_write(tmp, "run.toml", toml)))


def _check(tmp: Path, name: str, content: str | bytes, *args: str) -> list[str]:
    return ["data", "check", str(_write(tmp, name, content)), *args]


def _parquet(tmp: Path) -> Path:
    p = tmp / "rows.parquet"
    pd.DataFrame(
        {"body": ["good pill", "bad pill"], "rating": ["positive", "negative"]}
    ).to_parquet(p)
    return p


def _images(tmp: Path, x: Inputs, folder: Path) -> list[str]:
    return [
        "simulate",
        "--task",
        "image-cls",
        "--model",
        str(x.vit),
        "--data",
        str(folder),
        "--test",
        str(folder),
        "--labels",
        "a,b",
        "--rounds",
        "1",
        "--out",
        str(tmp / "run"),
    ]


def _no_class_folders(tmp: Path, x: Inputs) -> list[str]:
    folder = tmp / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "loose.png")  # an image, but in no class folder
    return _images(tmp, x, folder)


def _unreadable_image(tmp: Path, x: Inputs) -> list[str]:
    folder = tmp / "images"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / label / f"{i}.png")
    _write(folder / "b", "broken.png", b"not a png at all")
    return _images(tmp, x, folder)


def _predict(tmp: Path, x: Inputs, adapter: Path, *args: str) -> list[str]:
    rows = _write(tmp, "new.csv", "review\ngood pill\n")
    return ["predict", "--adapter", str(adapter), "--input", str(rows), *args]


def _adapter_without(tmp: Path, x: Inputs, name: str) -> Path:
    adapter = _copy(x.adapter, tmp, "adapter")
    (adapter / name).unlink()
    return adapter


def _adapter_of_another_shape(tmp: Path, x: Inputs) -> list[str]:
    from safetensors.torch import load_file, save_file

    adapter = _copy(x.adapter, tmp, "adapter")
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: torch.cat([t, t]) if "lora_A" in k else t for k, t in tensors.items()}, weights)
    return _predict(tmp, x, adapter)


def _site(tmp: Path, x: Inputs, **override: str) -> list[str]:
    values = {
        "--coordinator": "127.0.0.1:9093",
        "--certs": str(x.pki),
        "--key": str(x.site_key),
        "--data": str(x.csv),
        "--state": str(tmp / "state"),
        **override,
    }
    return ["site", *(a for kv in values.items() for a in kv)]


def _coordinator(tmp: Path, x: Inputs, spoil: Callable[[Path], None]) -> list[str]:
    certs = _copy(x.pki, tmp, "pki")
    spoil(certs)
    return ["coordinator", "--certs", str(certs), "--state", str(tmp / "state")]


def _key_of_another_pki(certs: Path) -> None:
    other = init_ca(certs.parent / "other")
    (certs / "server.key").write_bytes(other["server_key"].read_bytes())
    shutil.rmtree(certs.parent / "other")


def _reply_refused(arrays: dict[str, torch.Tensor], **metrics: float) -> Callable[[], None]:
    """The coordinator sends one site ``w`` (2×2) and gets ``arrays`` back: the round must
    stop with the one-line FedhavenError, the rejection logged in one line."""

    def run() -> None:
        strategy = FedAvg(stop_below_minimum=True, min_train_nodes=1, min_available_nodes=1)

        class Grid:
            def get_node_ids(self) -> list[int]:
                return [7]

        sent = ArrayRecord({"w": torch.zeros(2, 2)})
        list(strategy.configure_train(1, sent, ConfigRecord(), Grid()))  # type: ignore[arg-type]
        content = RecordDict(
            {
                protocol.ARRAYS: ArrayRecord(arrays),
                protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 5, **metrics}),
            }
        )
        instruction = Message(RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
        strategy.aggregate_train(1, [Message(content, reply_to=instruction)])

    return run


# ------------------------------------------------------------------ the table

CASES: list[Case] = [
    # simulate: flags
    Case(
        "simulate-missing-data",
        lambda t, x: _simulate(t, x, "--data", str(t / "nope.csv")),
        "nope.csv' not found",
    ),
    Case(
        "simulate-missing-model",
        lambda t, x: _simulate(t, x, "--model", str(t / "no-model")),
        "no-model'",
    ),
    Case(
        "simulate-bad-partition",
        lambda t, x: _simulate(t, x, "--partition", "dirichlet:-1"),
        "config 'data.partition'",
    ),
    Case(
        "simulate-unknown-preset",
        lambda t, x: _simulate(t, x, "--preset", "poems"),
        "unknown preset 'poems': use one of",
    ),
    Case(
        "simulate-unknown-task",
        lambda t, x: _simulate(t, x, "--task", "poems"),
        "config 'model.task' = 'poems' is invalid",
    ),
    Case(
        "simulate-set-without-equals",
        lambda t, x: _simulate(t, x, "--set", "lora.r"),
        "is not KEY=VALUE: e.g.",
    ),
    Case(
        "simulate-ray-address-malformed",
        lambda t, x: _simulate(t, x, "--ray-address", "ray-head"),
        "--ray-address 'ray-head' is not HOST:PORT",
    ),
    Case(
        "simulate-too-many-sites",
        lambda t, x: _simulate(t, x, "--sites", "500"),
        "500 sites but only 60 rows: use fewer sites",
    ),
    # run config: values and keys, in a --config file
    Case(
        "config-missing-file",
        lambda t, x: _simulate(t, x, "--config", str(t / "none.toml")),
        "none.toml",
    ),
    Case("config-not-toml", lambda t, x: _config(t, x, "lora.r = = 4\n"), "run.toml"),
    Case(
        "config-unknown-key",
        lambda t, x: _config(t, x, "[lora]\nrank = 4\n"),
        "unknown config key 'lora.rank'",
    ),
    Case(
        "config-lora-r-zero",
        lambda t, x: _config(t, x, "[lora]\nr = 0\n"),
        "config 'lora.r' = 0 is invalid",
    ),
    Case(
        "config-wrong-type",
        lambda t, x: _config(t, x, '[train]\nlearning-rate = "fast"\n'),
        "'train.learning-rate'",
    ),
    Case(
        "config-not-a-whole-number",
        lambda t, x: _config(t, x, '[lora]\nalpha = "big"\n'),
        "config 'lora.alpha' = 'big' is invalid: expected a whole number",
    ),
    Case(
        "sites-state-dir-is-a-file",
        lambda t, x: _simulate(t, x, "--site-state", str(_write(t, "state", "not a dir"))),
        "'sites.state-dir' = '{tmp}/state' is not a directory: give a directory",
    ),
    Case(  # caught before the run starts, not in each site's first round
        "config-probe-rounds-without-head",
        lambda t, x: _config(t, x, '[lora]\nmodules-to-save = ""\n[train]\nprobe-rounds = 2\n'),
        "config 'train.probe-rounds' = 2: the model has no head to train alone",
    ),
    Case(  # the recipe's keys take "auto" too: the error says so
        "config-recipe-key-not-a-number",
        lambda t, x: _config(t, x, '[train]\nbatch-size = "big"\n'),
        "config 'train.batch-size' = 'big' is invalid: expected a whole number or 'auto'",
    ),
    Case(
        "config-unknown-strategy",
        lambda t, x: _config(t, x, '[federation]\nstrategy = "fedbest"\n'),
        "'federation.strategy'",
    ),
    # the sites' own settings: sites.* in a config file, --site-* flags
    Case(
        "sites-unknown-setting",
        lambda t, x: _config(t, x, "[sites]\nbudget = 8\n"),
        "unknown site setting 'sites.budget'",
    ),
    Case(
        "sites-budget-count",
        lambda t, x: _simulate(t, x, "--sites", "3", "--site-budget", "8,8"),
        "'sites.epsilon-budget' = '8,8' is invalid",
    ),
    Case(
        "sites-update-scale-count",
        lambda t, x: _simulate(t, x, "--sites", "3", "--site-update-scale", "100,1"),
        "give 3 comma-separated numbers",
    ),
    # data files
    Case(
        "data-missing-column",
        lambda t, x: _check(t, "d.csv", "body,rating\ngood,positive\n"),
        "column 'review' not found",
    ),
    Case("data-empty-file", lambda t, x: _check(t, "d.csv", ""), "is empty"),
    Case(
        "data-not-utf8",
        lambda t, x: _check(t, "d.csv", "review,rating\ncaf\xe9 good,positive\n".encode("latin-1")),
        "UTF-8",
    ),
    Case(
        "data-jsonl-bad-line",
        lambda t, x: _check(
            t, "d.jsonl", '{"review": "good", "rating": "positive"}\n{"review": "bad",\n'
        ),
        "line 2 is not valid JSON",
    ),
    Case(
        "data-parquet-without-text-column",
        lambda t, x: ["data", "check", str(_parquet(t))],
        "column 'review' not found",
    ),
    Case(
        "data-unknown-format",
        lambda t, x: _check(t, "d.xlsx", "review,rating\n"),
        "d.xlsx",
    ),
    Case(
        "data-check-label-rule",
        lambda t, x: _check(t, "d.csv", "review,rating\ngood,positive\n", "--label-rule", "fix"),
        "'label-rule' = 'fix' is invalid: use drop, map, stop",
    ),
    Case(
        "data-check-json-is-the-data",
        lambda t, x: _check(
            t, "d.csv", "review,rating\ngood,positive\n", "--json", str(t / "d.csv")
        ),
        "is the data file itself: name another file",
    ),
    Case("images-no-class-folders", _no_class_folders, "is not in a label subfolder: put each"),
    Case("images-unreadable-image", _unreadable_image, "broken.png"),
    # adapter directories
    Case(
        "adapter-missing-config",
        lambda t, x: _predict(t, x, _adapter_without(t, x, "adapter_config.json")),
        "has no adapter_config.json: copy the whole adapter directory again",
    ),
    Case(
        "adapter-missing-weights",
        lambda t, x: _predict(t, x, _adapter_without(t, x, "adapter_model.safetensors")),
        "has no adapter weights",
    ),
    Case(
        "adapter-weights-of-another-shape",
        _adapter_of_another_shape,
        "its weights do not fit the model",
    ),
    Case(
        "adapter-not-a-directory",
        lambda t, x: _predict(t, x, t / "no-adapter"),
        "is not a fedhaven adapter directory (no fedhaven_config.json): pass the adapter",
    ),
    Case(
        "predict-output-exists",
        lambda t, x: _predict(t, x, x.adapter, "--output", str(_write(t, "out.csv", "mine\n"))),
        "exists: pass another path, or --force",
    ),
    Case(
        "predict-output-suffix",
        lambda t, x: _predict(t, x, x.adapter, "--output", str(t / "out.txt")),
        "use .csv or .jsonl",
    ),
    Case(
        "predict-missing-input",
        lambda t, x: ["predict", "--adapter", str(x.adapter), "--input", str(t / "none.csv")],
        "none.csv' not found",
    ),
    Case(
        "export-merge-dir-not-empty",
        lambda t, x: [
            "export",
            "--adapter",
            str(x.adapter),
            "--merge",
            str(_write(t, "merged/keep.txt", "mine").parent),
        ],
        "exists and is not empty: pass a new directory to --merge",
    ),
    Case(
        "export-adapter-missing-weights",
        lambda t, x: [
            "export",
            "--adapter",
            str(_adapter_without(t, x, "adapter_model.safetensors")),
            "--merge",
            str(t / "merged"),
        ],
        "has no adapter weights",
    ),
    # certificates
    Case(
        "certs-missing-ca",
        lambda t, x: _site(t, x, **{"--certs": str(t / "pki")}),
        "CA certificate '{tmp}/pki' not found: give the coordinator's ca.crt",
    ),
    Case(
        "certs-ca-not-pem",
        lambda t, x: _site(t, x, **{"--certs": str(_write(t, "ca.crt", "garbage"))}),
        "is not a PEM certificate",
    ),
    Case(
        "certs-missing-site-key",
        lambda t, x: _site(t, x, **{"--key": str(t / "site.key")}),
        "site key '{tmp}/site.key' not found",
    ),
    Case(
        "certs-server-key-does-not-match",
        lambda t, x: _coordinator(t, x, _key_of_another_pki),
        "is not the key of",
    ),
    Case(
        "certs-server-cert-not-pem",
        lambda t, x: _coordinator(t, x, lambda d: (d / "server.pem").write_text("garbage")),
        "is not a PEM certificate",
    ),
    Case(
        "certs-bad-site-name",
        lambda t, x: ["certs", "site", "bad name!", str(t / "keys")],
        "bad name!",
    ),
    Case(
        "certs-init-exists",
        lambda t, x: ["certs", "init", str(_copy(x.pki, t, "pki"))],
        "--force",
    ),
    Case(
        "certs-init-days",
        lambda t, x: ["certs", "init", str(t / "new"), "--days", "0"],
        "a certificate must be valid for at least 1 day",
    ),
    # a site's settings (the fedhaven site flags)
    Case(
        "site-coordinator-without-port",
        lambda t, x: _site(t, x, **{"--coordinator": "localhost"}),
        "--coordinator 'localhost' is not HOST:PORT",
    ),
    Case(
        "site-negative-budget",
        lambda t, x: _site(t, x, **{"--epsilon-budget": "-1"}),
        "--epsilon-budget -1 is invalid",
    ),
    Case("site-delta-one", lambda t, x: _site(t, x, **{"--delta": "1"}), "--delta 1 is invalid"),
    Case(
        "site-coordinator-unresolvable",
        lambda t, x: _site(t, x, **{"--coordinator": "no-such-host.invalid:9093"}),
        "host 'no-such-host.invalid' cannot be resolved",
    ),
    Case(
        "site-insecure-with-key",
        lambda t, x: [*_site(t, x), "--insecure"],
        "--insecure uses no certificate and no key: drop --certs and --key",
    ),
    Case(
        "coordinator-insecure-with-sites",
        lambda t, x: ["coordinator", "--insecure", "--sites", str(x.pki), "--state", str(t / "s")],
        "--sites registers keys for SuperNode authentication, which --insecure turns off",
    ),
    Case(
        "site-missing-data",
        lambda t, x: _site(t, x, **{"--data": str(t / "site.csv")}),
        "data file '{tmp}/site.csv' not found",
    ),
    Case(
        "site-label-rule",
        lambda t, x: _site(t, x, **{"--label-rule": "fix"}),
        "'label-rule' = 'fix' is invalid: use drop, map, stop",
    ),
    Case(
        "coordinator-without-certs",
        lambda t, x: ["coordinator", "--state", str(t / "state")],
        "--certs DIR is required",
    ),
    # audit, tune
    Case(
        "audit-missing-run",
        lambda t, x: ["audit", str(t / "no-run")],
        "no-run",
    ),
    Case(
        "audit-unfinished-run",
        lambda t, x: ["audit", str((t / "run").mkdir() or t / "run")],
        "has no summary.json: pass a run directory written by `fedhaven simulate` that finished",
    ),
    Case(
        "report-missing-run",
        lambda t, x: ["report", str(t / "no-run")],
        "run directory '{tmp}/no-run' not found: pass a run directory",
    ),
    Case(
        "ledger-missing",
        lambda t, x: ["ledger", "show", "--state", str(t / "state")],
        "no privacy ledger at '{tmp}/state/",
    ),
    Case(
        "data-digits-not-empty",
        lambda t, x: ["data", "digits", str(_write(t, "digits/mine.txt", "mine").parent)],
        "exists and is not empty: pass a new or empty directory",
    ),
    Case(
        "models-prepare-unknown",
        lambda t, x: ["models", "prepare", "gpt5"],
        "unknown model 'gpt5': use one of",
    ),
    Case(
        "site-port-out-of-range",
        lambda t, x: _site(t, x, **{"--coordinator": "127.0.0.1:99999"}),
        "port 99999 is not a TCP port: give one in 1..65535",
    ),
    Case(
        "simulate-empty-data",
        lambda t, x: _simulate(t, x, "--data", str(_write(t, "empty.csv", ""))),
        "is empty: it needs a header and labeled rows",
    ),
    Case("tune-zero-trials", lambda t, x: ["tune", "--trials", "0"], "give at least 1"),
    Case(
        "tune-unknown-key",
        lambda t, x: ["tune", "--trials", "1", "--set", "train.lr=0.1", "--out", str(t / "tune")],
        "unknown config key 'train.lr'",
    ),
    # replies, at the coordinator
    Case(
        "reply-tensor-outside-allow-list",
        lambda t, x: _reply_refused({"w": torch.ones(2, 2), "embeddings": torch.ones(4)}),
        "unexpected ['embeddings']",
    ),
    Case(
        "reply-wrong-shape",
        lambda t, x: _reply_refused({"w": torch.ones(3, 2)}),
        "reply tensor 'w' has shape (3, 2), expected (2, 2)",
    ),
]


# ------------------------------------------------------------------ running a row


@pytest.fixture(scope="module")
def inputs(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    tiny_vit_dir: Path,
    tiny_csv: Path,
    tiny_test_csv: Path,
    tiny_cfg: Config,
) -> Inputs:
    root = tmp_path_factory.mktemp("valid")
    adapter = root / "adapter"
    save_trained(build_model(tiny_cfg), tiny_cfg, adapter)
    init_ca(root / "pki")
    keys = site_keys("site-a", root / "keys")
    return Inputs(
        model=tiny_model_dir,
        vit=tiny_vit_dir,
        csv=tiny_csv,
        test_csv=tiny_test_csv,
        adapter=adapter,
        pki=root / "pki",
        site_key=keys["private_key"],
    )


def _digests(roots: list[Path]) -> dict[str, str]:
    """SHA-256 of every file under ``roots``."""
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*")))]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def _run_cli(args: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str, str]:
    """The ``fedhaven`` entry point, in this process: exit code, stdout, stderr (with the
    warnings it logged, which a real run prints to stderr)."""
    caplog.clear()
    runner = CliRunner()
    with runner.isolation() as (out, err, _), caplog.at_level(logging.WARNING):
        argv, sys.argv = sys.argv, ["fedhaven", *args]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.argv = argv
        stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    logged = "".join(f"{r.levelname}: {r.getMessage()}\n" for r in caplog.records)
    return code, stdout, stderr + logged


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_mistake_is_refused_in_one_line(
    case: Case, inputs: Inputs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made = case.make(tmp_path, inputs)
    fragment = case.fragment.format(tmp=tmp_path)
    watched = [tmp_path, *inputs.watched()]
    before = _digests(watched)
    if callable(made):  # a reply: no exit code, the coordinator's refusal
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(FedhavenError) as refusal:
            made()
        lines = [str(refusal.value), *(r.getMessage() for r in caplog.records)]
        assert all("\n" not in line for line in lines), lines
        assert any(fragment in line for line in lines), lines
    else:
        code, out, err = _run_cli(made, caplog)
        assert code != 0, (out, err)
        assert "Traceback" not in out + err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert fragment in lines[0], lines[0]
    assert _digests(watched) == before, "a file the user gave changed"
