"""The harness's per-site settings: what a simulated site sets for itself."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from fedhaven.config import DELTA, EPSILON_BUDGET, STATE_DIR, Config
from fedhaven.errors import FedhavenError
from fedhaven.simulations import (
    PATH_KEYS,
    _absolute,
    backend_config,
    check_ray_address,
    site_settings,
)


def _cfg(sites: int = 3) -> Config:
    return Config().replace(**{"federation.sites": sites, "federation.out-dir": "runs/r1"})


def test_defaults_give_every_site_its_own_state_dir_under_the_run() -> None:
    assert site_settings({}, _cfg()) == {
        i: {STATE_DIR: f"runs/r1/sites/site-{i}"} for i in range(3)
    }


@pytest.mark.parametrize("budget", [4.0, "4", [4, 4, 4], "4,4,4"])
def test_one_budget_or_one_per_site(budget: object) -> None:
    sites = site_settings({EPSILON_BUDGET: budget, STATE_DIR: "state"}, _cfg())
    assert [s[EPSILON_BUDGET] for s in sites.values()] == [4.0, 4.0, 4.0]
    assert sites[2][STATE_DIR] == "state/site-2"


def test_per_site_budgets_and_deltas() -> None:
    sites = site_settings({EPSILON_BUDGET: [8, 2.5, 1], DELTA: "1e-5,1e-6,1e-5"}, _cfg())
    assert [s[EPSILON_BUDGET] for s in sites.values()] == [8.0, 2.5, 1.0]
    assert [s[DELTA] for s in sites.values()] == [1e-5, 1e-6, 1e-5]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({EPSILON_BUDGET: [8, 8]}, r"'sites.epsilon-budget' = \[8, 8\] is invalid: give one"),
        ({EPSILON_BUDGET: "8,x,8"}, "'sites.epsilon-budget' = '8,x,8' is invalid"),
        ({EPSILON_BUDGET: 0}, "'sites.epsilon-budget' = 0 is invalid"),
        ({DELTA: 1.5}, r"'sites.delta' = 1.5 is invalid: give one number in \(0, 1\)"),
        ({"budget": 8}, "unknown site setting 'sites.budget': valid ones are sites.state-dir"),
    ],
)
def test_bad_site_settings_name_the_key_and_the_fix(spec: dict, match: str) -> None:
    with pytest.raises(FedhavenError, match=match):
        site_settings(spec, _cfg())


@pytest.mark.parametrize(("site_cpus", "cores", "per_site"), [(2, 2, 2), (2, 16, 2), (4, 2, 2)])
def test_each_simulated_site_gets_its_cpus_at_most_the_machines(
    site_cpus: int, cores: int, per_site: int
) -> None:
    cfg = _cfg().replace(**{"federation.site-cpus": site_cpus})
    backend = backend_config(cfg, cores=cores)
    assert backend["client_resources"] == {"num_cpus": per_site, "num_gpus": 0.0}
    assert backend["init_args"]["num_cpus"] == cores


def test_site_cpus_below_one_is_refused() -> None:
    with pytest.raises(FedhavenError, match=r"config 'federation.site-cpus' = 0 is invalid"):
        _cfg().replace(**{"federation.site-cpus": 0})


def test_on_a_ray_cluster_the_cluster_decides_the_cpus() -> None:
    # ray.init refuses num_cpus when it joins a cluster, and the cluster's nodes, not this
    # machine, bound a site's CPUs (Flower fits its actors to each node)
    cfg = _cfg().replace(**{"federation.site-cpus": 4})
    backend = backend_config(cfg, cores=2, ray_address="10.0.0.5:6379")
    assert backend["init_args"]["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in backend["init_args"]
    assert backend["client_resources"] == {"num_cpus": 4, "num_gpus": 0.0}


@pytest.mark.parametrize("address", ["localhost", "ray://10.0.0.5:10001", ":6379", "h:0", "h:x"])
def test_a_malformed_ray_address_is_refused(address: str) -> None:
    with pytest.raises(FedhavenError, match=r"is not HOST:PORT: give the address 'ray start"):
        check_ray_address(address)


def test_a_ray_address_nothing_answers_at_fails_in_bounded_time() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # (an unroutable address is no test: a sandbox's network may accept every connection)
    address, timeout = f"127.0.0.1:{port}", 5.0
    t0 = time.monotonic()
    with pytest.raises(FedhavenError, match=rf"^no Ray cluster at {address}: .+; start one"):
        check_ray_address(address, timeout=timeout)
    assert time.monotonic() - t0 < timeout + 1


def test_a_listening_ray_address_passes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_ray_address(f"127.0.0.1:{s.getsockname()[1]}")


def test_cluster_runs_get_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    flat = {"data.path": "d/train.csv", "model.path": "bundled", "federation.out-dir": "runs/x"}
    flat |= {"data.test-path": str(tmp_path / "t.csv"), "lora.r": 4}
    out = _absolute(flat, PATH_KEYS)
    assert out == {
        **flat,
        "data.path": str(tmp_path / "d" / "train.csv"),
        "federation.out-dir": str(tmp_path / "runs" / "x"),
    }
    assert flat["data.path"] == "d/train.csv"  # the caller's mapping is left as it was
