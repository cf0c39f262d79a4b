"""Measure how long scalesocket.py takes to exit on SIGTERM with silent clients and stubborn children.

    python3 bench/shutdown.py                 # 5 runs each with --workers 1 and 2
    python3 bench/shutdown.py --runs 10 --workers 1
    python3 bench/shutdown.py --scalesocket OTHER/scalesocket.py

The scenario of test_sigterm_exits_promptly_with_silent_clients_and_stubborn_children:
5 rooms whose children ignore SIGTERM (they trap it and go on) and 50
clients that never answer (5 of them read their room's first line, then
nothing more; the test adds one client that answers the close). The time is
from just before the SIGTERM until the server has exited (its wait()
returned); the server's own constants set it (KILL_GRACE, 2 s, before the
children get SIGKILL), the rest is the exit itself. The test asserts only
that it falls between KILL_GRACE and CLOSE_TIMEOUT; this script prints the
figure (min, median, max over the runs).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
STUBBORN = ("import os, signal, sys\nsignal.signal(signal.SIGTERM, lambda signum, frame: None)\n"
            "print(os.getpid(), flush=True)\nsys.stdin.read()\nimport time\nwhile True:\n    time.sleep(60)")


def upgrade(port: int, room: str) -> tuple[socket.socket, bytes]:
    """Open a WebSocket to the room; return the socket once the 101 is in, and what came after it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /{room} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"no 101 from the server: {buf!r}")
        buf += data
    if not buf.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(buf[:80])
    return sock, buf.partition(b"\r\n\r\n")[2]


def first_frame(sock: socket.socket, rest: bytes = b"") -> bytes:
    """Read the first (unmasked, short) server frame's payload."""
    buf = rest
    while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed before the first frame")
        buf += data
    return buf[2:2 + (buf[1] & 0x7F)]


def one_run(scalesocket: str, workers: int) -> float:
    proc = subprocess.Popen([sys.executable, scalesocket, "--addr", "127.0.0.1:0", "--workers", str(workers),
                             sys.executable, "--", "-u", "-c", STUBBORN],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port = None
        while port is None:
            line = proc.stderr.readline().decode()
            if not line:
                raise RuntimeError("the server exited before listening")
            match = re.search(r"listening on [\d.]+:(\d+)", line)
            port = int(match.group(1)) if match else None
        clients = []
        for room in range(5):  # each room's child is up (it said its pid) before the rest join
            sock, rest = upgrade(port, f"room{room}")
            clients.append(sock)
            first_frame(sock, rest)
        clients += [upgrade(port, f"room{i % 5}")[0] for i in range(45)]  # silent: never read again
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        took = time.monotonic() - started
        for sock in clients:
            sock.close()
        if proc.returncode != 0:
            raise RuntimeError(f"exit status {proc.returncode}")
        return took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", default="1,2", help="comma list of --workers values (default 1,2)")
    parser.add_argument("--scalesocket", default=os.path.join(HERE, "..", "scalesocket.py"))
    args = parser.parse_args()
    for workers in [int(w) for w in args.workers.split(",")]:
        times = [one_run(args.scalesocket, workers) for _ in range(args.runs)]
        print(f"--workers {workers}: exit {min(times):.2f} / {statistics.median(times):.2f} / {max(times):.2f} s "
              f"after SIGTERM (min / median / max of {args.runs} runs)", flush=True)


if __name__ == "__main__":
    main()
