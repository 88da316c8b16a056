"""What the command modules share: the consoles, number formatting, quiet libraries."""

from __future__ import annotations

import logging
import warnings

from rich.console import Console

console = Console()
err = Console(stderr=True)


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def quiet_libraries() -> None:
    """One line per round (or trial) is the output; Flower's notices (run_simulation's
    deprecation among them) and library warnings go to --verbose. Failed sites are still
    logged."""
    from transformers.utils import logging as hf_logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
