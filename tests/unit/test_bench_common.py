"""bench/common.py's run cache: a shared run is reused for the same arguments under the same
code, and not under other code (a new default reads the same arguments)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import common


def test_a_run_is_keyed_by_its_arguments_its_draw_and_the_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = common.run_key(["--no-dp"])
    assert key == common.run_key(["--no-dp"])
    assert key != common.run_key(["--no-dp", "--seed", "1"])
    assert key != common.run_key(["--no-dp"], draw=2)
    monkeypatch.setattr(common, "code_digest", lambda: "other code")
    assert common.run_key(["--no-dp"]) != key


def test_the_code_digest_reads_fedhaven_and_the_run_config_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "fedhaven").mkdir()
    source = tmp_path / "fedhaven" / "training.py"
    source.write_text("RATE = 0.03\n")
    (tmp_path / "pyproject.toml").write_text('"federation.server-momentum" = "auto"\n')
    monkeypatch.setattr(common, "ROOT", tmp_path)

    def digest() -> str:
        common.code_digest.cache_clear()
        return common.code_digest()

    try:
        first = digest()
        assert digest() == first
        source.write_text("RATE = 0.01\n")
        assert digest() != first
        source.write_text("RATE = 0.03\n")
        (tmp_path / "pyproject.toml").write_text('"federation.server-momentum" = 0.0\n')
        assert digest() != first
    finally:
        common.code_digest.cache_clear()  # not this folder's digest for later callers
