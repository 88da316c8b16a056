"""The warm start of a deployed site (fedhaven.deploy.warm): the launcher the SuperExec
starts as ``flwr-clientapp`` hands its message to a fork of the warm process, or, with no
warm process, becomes the real ``flwr-clientapp``. The entry point here is a stand-in
that reports where it ran; the deployment test runs Flower's own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedhaven.deploy import warm
from fedhaven.errors import FedhavenError

ENTRY = """
import json, os, sys, time
def run():
    print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv,
                      "x": os.environ.get("FEDHAVEN_TEST_X"), "cwd": os.getcwd()}), flush=True)
    if "--sleep" in sys.argv:
        time.sleep(60)
    sys.exit(int(sys.argv[-1]))
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # a Unix socket's path must stay short: not under pytest's long tmp_path
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fh-") as d:
        yield Path(d)


@pytest.fixture
def real(short_dir: Path) -> str:
    script = short_dir / "real-flwr-clientapp"
    script.write_text('#!/bin/sh\necho "cold $*"\nexit 5\n')
    script.chmod(0o700)
    return str(script)


@pytest.fixture
def server(short_dir: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    (short_dir / "stand_in_entry.py").write_text(ENTRY)
    sock = short_dir / warm.SOCKET_NAME
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(short_dir), *sys.path])}
    command = [sys.executable, "-m", "fedhaven.deploy.warm", str(sock)]
    proc = subprocess.Popen(
        [*command, "--preload", "json", "--entry", "stand_in_entry:run"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert warm.READY in proc.stdout.readline()
    try:
        yield proc, sock
    finally:
        proc.terminate()
        proc.wait(10)
    assert not sock.exists()  # removed when the warm process stops


def _launch(script: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEDHAVEN_TEST_X": "from-the-superexec"}
    return subprocess.run(
        [str(script), *args], env=env, capture_output=True, text=True, timeout=30, **kw
    )


def test_a_message_runs_in_a_fork_of_the_warm_process_with_the_launchers_args_env_and_cwd(
    server: tuple[subprocess.Popen[str], Path], short_dir: Path, real: str, tmp_path: Path
) -> None:
    proc, sock = server
    launcher = warm.install_launcher(short_dir, sock, real)
    assert launcher.name == "flwr-clientapp" and os.access(launcher, os.X_OK)
    done = _launch(launcher, "--token", "abc", "7", cwd=tmp_path)
    assert done.returncode == 7  # the fork's exit status, relayed
    seen = json.loads(done.stdout)  # the fork wrote to the launcher's own stdout
    assert seen["ppid"] == proc.pid and seen["pid"] != proc.pid
    assert seen["argv"] == ["flwr-clientapp", "--token", "abc", "7"]
    assert seen["x"] == "from-the-superexec" and seen["cwd"] == str(tmp_path)
    second = json.loads(_launch(launcher, "0").stdout)
    assert second["ppid"] == proc.pid and second["pid"] != seen["pid"]  # a fork per message


def _reply_once(sock: Path, reply: bytes) -> threading.Thread:
    """A stand-in warm process: takes one request, sends ``reply`` in one segment, closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            _, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            for fd in fds:
                os.close(fd)
            conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_pid_and_exit_status_that_arrive_together_are_both_read(
    short_dir: Path, real: str
) -> None:
    # A fork that ends before the launcher reads its pid: both lines in one segment. The
    # launcher once read them as one line, failed, and ran the message again cold.
    sock = short_dir / warm.SOCKET_NAME
    thread = _reply_once(sock, b"4242\n7\n")
    done = _launch(warm.install_launcher(short_dir, sock, real), "--token", "abc")
    thread.join(10)
    assert (done.returncode, done.stdout) == (7, "")


def test_a_handed_over_message_without_a_reply_fails_and_is_not_run_cold(
    short_dir: Path, real: str
) -> None:
    sock = short_dir / warm.SOCKET_NAME
    thread = _reply_once(sock, b"")  # the warm process closes after taking the message
    done = _launch(warm.install_launcher(short_dir, sock, real), "--token", "abc")
    thread.join(10)
    assert (done.returncode, done.stdout) == (1, "")
    assert "no reply from the warm process" in done.stderr


def test_a_fork_whose_exit_status_never_comes_fails_with_a_line(short_dir: Path, real: str) -> None:
    sock = short_dir / warm.SOCKET_NAME
    thread = _reply_once(sock, b"4242\n")  # a pid, then the warm process is gone
    done = _launch(warm.install_launcher(short_dir, sock, real), "--token", "abc")
    thread.join(10)
    assert (done.returncode, done.stdout) == (1, "")
    assert "no exit status from the warm process" in done.stderr


def test_without_a_warm_process_the_launcher_becomes_the_real_flwr_clientapp(
    short_dir: Path, real: str
) -> None:
    launcher = warm.install_launcher(short_dir, short_dir / "nobody.sock", real)
    done = _launch(launcher, "--token", "abc")
    assert (done.returncode, done.stdout) == (5, "cold --token abc\n")


def test_sigterm_to_the_launcher_stops_its_fork(
    server: tuple[subprocess.Popen[str], Path], short_dir: Path, real: str
) -> None:
    _, sock = server
    launcher = warm.install_launcher(short_dir, sock, real)
    env = {**os.environ, "FEDHAVEN_TEST_X": "x"}
    run = subprocess.Popen(
        [str(launcher), "--sleep", "0"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert run.stdout is not None
    fork = json.loads(run.stdout.readline())["pid"]
    run.send_signal(signal.SIGTERM)
    assert run.wait(10) == 128 + signal.SIGTERM  # as a shell reports a process killed by it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(fork, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the fork {fork} outlived its launcher")


def test_a_path_with_a_single_quote_is_refused_with_the_fix(short_dir: Path, real: str) -> None:
    odd = short_dir / "it's"
    odd.mkdir()
    with pytest.raises(FedhavenError, match=r"single quote.*--cold-start"):
        warm.install_launcher(odd, odd / "warm.sock", real)
    assert list(odd.iterdir()) == []
