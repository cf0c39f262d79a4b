"""One flooder in a room: what --maxrate does for the room's other clients.

    python3 bench/flood.py                       # 10 s a phase, 3 runs each, --maxrate 100
    python3 bench/flood.py --seconds 20 --rate 50:50 --workers 2 --repeats 5

Three phases against ``scalesocket.py [--maxrate RATE] cat``, one room:

1. alone:      an ordinary client sends a 32-byte text message every 10 ms and
               times the round trip of each (its own echo; the room's other
               messages are read and skipped);
2. flood:      the same, while a flooder in the same room sends 1 KiB text
               messages as fast as its socket takes them (and reads and
               drops what comes back), with --maxrate RATE;
3. unlimited:  the same flood without --maxrate, for contrast.

Each client runs in a process of its own (this script with --role), so
none waits on another's GIL. Printed per phase: the ordinary client's
round trips (count, p50, p99, max), what the flooder got in (messages/s, as
the echoes it read back show), and the CPU the server tree used. The goal
of issue 16: the p99 with a flooder and --maxrate within 2x of the p99
alone.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import scalesocket as ss  # noqa: E402  (the frames, masked, from the file under test)

UPGRADE = ("GET /{room} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


def connect(port: int, room: str) -> tuple[socket.socket, bytearray]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(UPGRADE.format(room=room).encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("the server closed the connection during the handshake")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"handshake refused: {head[:80]!r}")
    return sock, bytearray(rest)


def frames(buf: bytearray):
    """Yield (opcode, payload) of the whole server frames in buf, and remove them."""
    while len(buf) >= 2:
        length, at = buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return
            length, at = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if len(buf) < 10:
                return
            length, at = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < at + length:
            return
        opcode, payload = buf[0] & 0x0F, bytes(buf[at : at + length])
        del buf[: at + length]
        yield opcode, payload


def run_ordinary(port: int, seconds: float, interval: float) -> None:
    """Send a tagged message every ``interval`` s; print each round trip in µs."""
    sock, buf = connect(port, "flood")
    sock.setblocking(False)
    sent: dict[bytes, float] = {}
    rtts = []
    n = 0
    end = time.monotonic() + seconds
    next_send = time.monotonic()
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_send:
            tag = b"ordinary %08d " % n + b"." * 8
            sent[tag] = now
            sock.sendall(ss.encode_frame(ss.Opcode.TEXT, tag, mask_key=os.urandom(4)))
            n += 1
            next_send += interval
        ready, _, _ = select.select([sock], [], [], max(0.0, next_send - time.monotonic()))
        if ready:
            data = sock.recv(1 << 20)
            if not data:
                break
            buf += data
            now = time.monotonic()
            for opcode, payload in frames(buf):
                if opcode == 8:
                    print("closed", payload[:2].hex(), payload[2:].decode(errors="replace"), file=sys.stderr)
                    end = 0
                if payload in sent:
                    rtts.append((now - sent.pop(payload)) * 1e6)
    print("rtts", " ".join(f"{r:.0f}" for r in rtts), "lost", len(sent))


def run_flooder(port: int, seconds: float) -> None:
    """Send 1 KiB messages as fast as the socket takes them; read and count the echoes."""
    sock, buf = connect(port, "flood")
    sock.setblocking(False)
    frame = ss.encode_frame(ss.Opcode.TEXT, b"f" * 1024, mask_key=b"\x01\x02\x03\x04")
    batch = frame * 64
    pending = memoryview(b"")
    echoes = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ready_r, ready_w, _ = select.select([sock], [sock], [], 0.05)
        if ready_w:
            if not pending:
                pending = memoryview(batch)
            try:
                pending = pending[sock.send(pending):]
            except BlockingIOError:
                pass
        if ready_r:
            data = sock.recv(1 << 20)
            if not data:
                break
            buf += data
            for opcode, payload in frames(buf):
                echoes += payload.startswith(b"ffff")
    print("echoes", echoes)


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its descendants alive now, plus the reaped ones'."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = open(f"/proc/{name}/stat").read().rpartition(")")[2].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append((int(name), fields))
    todo = [pid]
    seen = set()
    while todo:
        p = todo.pop()
        seen.add(p)
        for child, _ in children.get(p, []):
            todo.append(child)
    for parent, procs in children.items():
        for p, fields in procs:
            if p in seen:
                total += sum(int(x) for x in fields[11:15]) / tick
    return total


def phase(name: str, server_args: list[str], seconds: float, interval: float, flood: bool) -> dict:
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "scalesocket.py"), "--addr", "127.0.0.1:0",
                               "--ping", "0", *server_args, "cat"], stderr=subprocess.PIPE, text=True)
    line = ""
    while "listening on" not in line:
        line = server.stderr.readline()
        if not line:
            raise SystemExit("the server did not start")
    port = int(re.search(r":(\d+)", line.split("listening on")[1]).group(1))
    cpu0 = tree_cpu(server.pid)
    me = [sys.executable, __file__, "--port", str(port), "--seconds", str(seconds), "--interval", str(interval)]
    ordinary = subprocess.Popen(me + ["--role", "ordinary"], stdout=subprocess.PIPE, text=True)
    flooder = subprocess.Popen(me + ["--role", "flooder"], stdout=subprocess.PIPE, text=True) if flood else None
    out = ordinary.communicate()[0]
    echoes = int(flooder.communicate()[0].split()[1]) if flooder else 0
    cpu = tree_cpu(server.pid) - cpu0
    server.terminate()
    server.wait(10)
    rtts = [float(x) for x in out.split("lost")[0].split()[1:]]
    lost = int(out.split("lost")[1])
    rtts.sort()
    pick = lambda q: rtts[min(len(rtts) - 1, int(q * len(rtts)))] if rtts else float("nan")  # noqa: E731
    return {"phase": name, "n": len(rtts), "lost": lost, "p50": pick(0.50), "p99": pick(0.99),
            "max": rtts[-1] if rtts else float("nan"), "flood": echoes / seconds, "cpu": cpu / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("ordinary", "flooder"))
    parser.add_argument("--port", type=int)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.01, help="the ordinary client's send interval")
    parser.add_argument("--rate", default="100", help="--maxrate for the flood phase (default: 100)")
    parser.add_argument("--workers", default="1")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.role == "ordinary":
        run_ordinary(args.port, args.seconds, args.interval)
        return
    if args.role == "flooder":
        run_flooder(args.port, args.seconds)
        return
    common = ["--workers", args.workers]
    phases = [("alone", common, False), (f"flood, --maxrate {args.rate}", common + ["--maxrate", args.rate], True),
              ("flood, no --maxrate", common, True)]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in phases}
    for _ in range(args.repeats):  # interleaved, so that a busy moment of the machine hits every phase alike
        for name, server_args, flood in phases:
            runs[name].append(phase(name, server_args, args.seconds, args.interval, flood))
    # Per phase, the run with the median p99.
    results = [sorted(runs[name], key=lambda r: r["p99"])[len(runs[name]) // 2] for name, _, _ in phases]
    print(f"--workers {args.workers}, {args.seconds:g} s a phase, {args.repeats} runs each (the median p99's run "
          f"shown), ordinary client every {args.interval * 1000:g} ms, load average {os.getloadavg()[0]:.2f}")
    print(f"{'phase':<26} {'round trips':>11} {'no echo':>7} {'p50 µs':>9} {'p99 µs':>9} {'max µs':>10} "
          f"{'flood msg/s':>11} {'server CPU':>10}")
    for r in results:
        print(f"{r['phase']:<26} {r['n']:>11} {r['lost']:>7} {r['p50']:>9.0f} {r['p99']:>9.0f} {r['max']:>10.0f} "
              f"{r['flood']:>11.0f} {r['cpu'] * 100:>9.0f}%")
    base = results[0]["p99"]
    print(f"p99 with the flooder and --maxrate: {results[1]['p99'] / base:.2f}x alone "
          f"(goal: at most 2x); without --maxrate: {results[2]['p99'] / base:.2f}x")


if __name__ == "__main__":
    main()
