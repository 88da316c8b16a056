"""`fedhaven predict`: a trained adapter applied to new rows, for every task.

Classification: the most probable label and each label's probability; causal-lm: the
generated answer. Rows are read and cleaned exactly as at the sites, without labels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from fedhaven.errors import FedhavenError
from fedhaven.models import load_trained, trained_config
from fedhaven.tasks import get_task
from fedhaven.training import default_device

#: Output formats, by the output file's suffix.
FORMATS = (".csv", ".jsonl")


def predict(adapter_dir: str | Path, input_path: str | Path) -> list[dict[str, Any]]:
    """One output row per input row, for the adapter's own task."""
    d = Path(adapter_dir)
    model = load_trained(d).to(default_device())
    task = get_task(trained_config(d))
    return task.predict(model, task.load(str(input_path), labeled=False))


def check_output(output: Path | None, force: bool) -> None:
    """Refuse an output we would not write, before any work: wrong suffix, existing file."""
    if output is None:
        return
    if output.suffix.lower() not in FORMATS:
        raise FedhavenError(
            f"--output '{output}' has suffix '{output.suffix}': use {' or '.join(FORMATS)}"
        )
    if output.exists() and not force:
        raise FedhavenError(f"--output '{output}' exists: pass another path, or --force")


def write(rows: list[dict[str, Any]], output: Path | None) -> None:
    """CSV or JSON lines by the suffix; JSON lines on stdout without an output."""
    if output is None:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
    elif output.suffix.lower() == ".csv":
        pd.DataFrame(rows).to_csv(output, index=False)
    else:
        output.write_text("".join(json.dumps(row) + "\n" for row in rows))
