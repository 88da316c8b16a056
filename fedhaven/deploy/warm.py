"""Warm start for a deployed site: one process with the imports done, forked per message.

Flower 1.42's SuperNode runs each message in a new ``flwr-clientapp`` process, started by
name from PATH by its SuperExec, and keeps none alive (Flower issue #3670; its warm
executors are for Kubernetes task types, not ClientApps). Such a process spends most of its
life importing torch, transformers, PEFT and Opacus (about 6 s on 2 CPU cores) before it
reads a message. So ``fedhaven site`` keeps one process that has done those imports
(:func:`serve`) and puts a small ``flwr-clientapp`` first on the SuperNode's PATH
(:func:`install_launcher`, running :mod:`fedhaven.deploy.launcher`): it hands its arguments
and streams to that process, which forks, and the fork runs Flower's own ``flwr-clientapp``
entry point with them. Messages, tokens, the ClientApp and exit statuses stay Flower's; only
the interpreter start and the imports are paid once per site instead of once per message.

The process never runs a model or a tensor op itself (torch's thread pools and forking do
not mix); every fork loads what it needs as a cold process would. The fork runs the site's
installed fedhaven (already imported), not a copy from the run's app bundle.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from fedhaven.errors import FedhavenError

#: What a ClientApp process spends its start on; imported once, before the socket opens.
PRELOAD = (
    "torch",
    "transformers",
    "peft",
    "opacus",
    "datasets",
    "fedhaven.client.app",
    "flwr.supernode.cli.flwr_clientapp",
)
ENTRY = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"
LAUNCHER_NAME = "flwr-clientapp"
SOCKET_NAME = "warm.sock"
#: Printed once the socket accepts: the site waits for it (before then, messages run cold).
READY = "warm start ready"
FORKED = "warm start: message in forked process"


def _load(ref: str) -> Callable[[], object]:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _run_fork(conn: socket.socket, listener: socket.socket, entry: Callable[[], object]) -> None:
    """In the fork: become the process the launcher stands for, run ``entry``, exit."""
    code = 1
    try:
        listener.close()
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(msg)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        conn.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = [LAUNCHER_NAME, *request["argv"]]
        entry()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # on the launcher's stderr, as a cold process would print it
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _serve_one(conn: socket.socket, listener: socket.socket, entry: Callable[[], object]) -> None:
    with conn:
        pid = os.fork()
        if pid == 0:
            _run_fork(conn, listener, entry)
        print(f"{FORKED} {pid}", flush=True)
        conn.sendall(f"{pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            conn.sendall(f"{code}\n".encode())


def serve(socket_path: Path, preload: Sequence[str] = PRELOAD, entry: str = ENTRY) -> None:
    """Import ``preload``, then fork once per launcher connection until SIGTERM."""
    for module in preload:
        importlib.import_module(module)
    run = _load(entry)
    socket_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, stat.S_IRUSR | stat.S_IWUSR)  # the site's user only
    listener.listen(16)
    print(f"{READY} (pid {os.getpid()})", flush=True)
    with listener:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=_serve_one, args=(conn, listener, run), daemon=True).start()


def install_launcher(bin_dir: Path, socket_path: Path, real: str) -> Path:
    """Write ``bin_dir/flwr-clientapp``: the launcher, for the front of the SuperNode's PATH."""
    launcher = Path(__file__).with_name("launcher.py")
    parts = [sys.executable, "-I", "-S", str(launcher), str(socket_path), real]
    if any("'" in p for p in parts):
        raise FedhavenError(
            f"a path in {parts} contains a single quote, which the warm start cannot pass "
            "on: move the state directory (or run the site with --cold-start)"
        )
    script = bin_dir / LAUNCHER_NAME
    # -I -S: the standard library only (no site-packages, no PYTHON* variables): a fast start
    script.write_text("#!/bin/sh\nexec " + " ".join(f"'{p}'" for p in parts) + ' "$@"\n')
    script.chmod(0o700)
    return script


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket", type=Path)
    parser.add_argument("--preload", nargs="*", default=list(PRELOAD))
    parser.add_argument("--entry", default=ENTRY)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.socket, args.preload, args.entry)
    except KeyboardInterrupt:
        pass
    finally:
        args.socket.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
