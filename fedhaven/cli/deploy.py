"""The deployment's commands: ``fedhaven certs``, ``fedhaven coordinator``, ``fedhaven site``.

Each starts or prepares one party of a real federation; the Flower processes and their
checks live in :mod:`fedhaven.deploy`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedhaven.cli import flags
from fedhaven.cli.common import console

certs_app = typer.Typer(no_args_is_help=True, help="TLS certificates and site keys.")


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
    label_rule: flags.LabelRule = "stop",
    min_per_class: flags.MinPerClass = 5,
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
