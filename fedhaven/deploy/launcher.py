"""The ``flwr-clientapp`` a warm site's SuperExec starts: asks the warm process for a fork.

Run by path with ``python -I -S`` (see :mod:`fedhaven.deploy.warm`), so it imports the
standard library only and starts in milliseconds. It hands its arguments, environment and
standard streams to the warm process, which forks and runs Flower's own ``flwr-clientapp``
with them; it forwards SIGTERM / SIGINT to that fork and exits with its exit status, as the
process the SuperExec started would. Without a warm process (not up yet, or gone) it becomes
the real ``flwr-clientapp`` (exec), so a message is never lost to the warm start; once a
message is handed over it is never run a second time cold.

Usage: ``launcher.py SOCKET REAL_FLWR_CLIENTAPP [flwr-clientapp arguments...]``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys


def _read_int(reply: io.BufferedReader) -> int:
    line = reply.readline()
    if not line.endswith(b"\n"):
        raise ConnectionError("the warm process closed the connection")
    return int(line)


def main(argv: list[str]) -> int:
    socket_path, real, args = argv[0], argv[1], argv[2:]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
        request = {"argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    except OSError:
        conn.close()
        os.execv(real, [real, *args])  # the cold path: Flower's own process
    # Buffered: a fork that ends at once sends its pid and exit status in one segment.
    reply = conn.makefile("rb")
    try:
        pid = _read_int(reply)
    except (OSError, ValueError) as e:
        # The message was handed over and may be running: never run it a second time cold.
        print(f"warm start: no reply from the warm process ({e})", file=sys.stderr)
        return 1

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        status = _read_int(reply)
    except (OSError, ValueError) as e:
        print(f"warm start: no exit status from the warm process ({e})", file=sys.stderr)
        return 1
    # A fork killed by a signal reports -N: exit as a shell reports it.
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
