#!/usr/bin/env python3
"""What --workers costs: CPU per connection and per delivery with 1, 2, 4 and 8 workers, in one run.

    python3 bench/scaling.py                   # about 4 minutes on an idle 2-core machine
    python3 bench/scaling.py --repeats 5 --workers 1,2,4
    python3 bench/scaling.py --no-tls          # without the wss:// part
    python3 bench/scaling.py --json /tmp/scaling.json
    python3 bench/scaling.py --scalesocket /tmp/main.py   # another scalesocket.py (e.g. main's, to compare)

Every figure is the CPU time of the whole server tree (the process started,
its workers, and the rooms' ``cat`` children, live or reaped) over the timed
phase, divided by what was done; the load generator (bench/go_loadgen, built
as bench.py builds it) is left out and reported apart. The configurations
run interleaved (1, 2, 4, 8, then 1, 2, 4, 8 again ...), so that whatever
else the machine does weighs on each alike; the table gives each figure's
median over the repeats, and its ratio to --workers 1.

* connections  --connections connections (default 3,000) over --rooms rooms
               (60), --concurrency at once (50); each opens, upgrades, sends
               a message and waits for its echo through the room's cat, then
               closes. A client stays in each room throughout (opened before
               the timed phase), so no child starts or stops meanwhile:
               CPU per connection and connections/s.
* deliveries   manyrooms at a fixed rate: 40 rooms of 25 clients, each
               client sending a 64 B message a second (25,000 deliveries/s):
               CPU per delivery.
* wss          (unless --no-tls; needs the openssl command) the connections
               workload over wss:// (a self-signed certificate) with 1 and 2
               workers: handshakes/s and CPU per connection; and CPU per
               delivery in one room of --room-clients clients (20) sending
               --room-rate messages/s each (10), with 2 workers, once with
               every client accepted by another worker than the room's (so
               each took the hop and is relayed: the room's worker is
               stopped with SIGSTOP while they connect) and once with every
               client accepted by the room's worker (the other is stopped).

Also printed: the load average and the CPU the load generator and the rest of
the machine used during the timed phases, since other programs may share the
cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the helpers: /proc readings, the load generator, its build)

sys.path.insert(0, bench.REPO_DIR)
import scalesocket  # noqa: E402  (worker_of: which worker owns the wss room)


SCALESOCKET = bench.SCALESOCKET  # the file run: --scalesocket


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process and all its descendants, the reaped ones too."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += (bench.cpu_seconds(p) or 0.0) + bench.reaped_children_seconds(p)
        todo += bench.children_of(p)
    return total


def start_server(workers: int, tls: tuple[str, str] | None = None) -> bench.Server:
    setup = bench.ServerSetup(scalesocket=SCALESOCKET, extra_args=["--workers", str(workers)] if workers > 1 else [])
    if tls:
        setup.extra_args += ["--tlscert", tls[0], "--tlskey", tls[1]]
    kind = "scalesocket"
    server = bench.Server(kind, f"scaling-w{workers}{'-tls' if tls else ''}", setup)
    if workers > 1:  # every worker up and waiting
        deadline = time.monotonic() + 15
        while len(bench.children_of(server.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
    return server


class Timed:
    """The CPU of the server tree, the load generator and the machine between two events."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def begin(self, event: dict) -> None:
        self.server0, self.machine0, self.gen0, self.t0 = tree_cpu(self.server_pid), bench.machine_cpu_seconds(), \
            event.get("cpu_s", 0.0), time.monotonic()

    def end(self, event: dict) -> dict:
        server = tree_cpu(self.server_pid) - self.server0
        machine = bench.machine_cpu_seconds() - self.machine0
        gen = event.get("cpu_s", 0.0) - self.gen0
        wall = time.monotonic() - self.t0
        return {"server_s": server, "gen_s": gen, "other_s": max(0.0, machine - server - gen), "wall_s": wall,
                "load": os.getloadavg()[0]}


def url(server: bench.Server, tls: bool) -> str:
    return f"{'wss' if tls else 'ws'}://{bench.HOST}:{server.port}"


def timed_phase(server: bench.Server, gen: bench.LoadGen, deadline: float) -> tuple[dict, dict]:
    """CPU of the server tree between the generator's 'begin' and 'end' lines; return it and the 'end' figures."""
    timed = Timed(server.pid)
    _, begin = gen.wait_for("begin", deadline)
    timed.begin(begin)
    _, end = gen.wait_for("end", deadline)
    cpu = timed.end(end)
    gen.finish()
    return cpu, end


def run_connections(workers: int, args, tls: tuple[str, str] | None = None) -> dict:
    server = start_server(workers, tls)
    try:
        gen = bench.LoadGen("go", "connect", ["--url", url(server, bool(tls)), "--count", str(args.connections),
                                              "--rooms", str(args.rooms), "--concurrency", str(args.concurrency),
                                              "--room", "conn"], timeout=120)
        cpu, end = timed_phase(server, gen, time.monotonic() + 150)
    finally:
        server.stop()
    done = end["connections"]
    return {**cpu, "connections": done, "failed": end["failed"], "errors": end["errors"],
            "cpu_per_conn_us": 1e6 * cpu["server_s"] / max(done, 1), "conn_per_s": end["per_s"]}


def run_deliveries(workers: int, args) -> dict:
    server = start_server(workers)
    try:
        gen = bench.LoadGen("go", "manyrooms", ["--url", url(server, False), "--rooms", "40", "--clients", "25",
                                                "--rate", str(args.rate), "--settle", "1", "--duration", "3",
                                                "--room", "room"], timeout=120)
        timed = Timed(server.pid)
        deadline = time.monotonic() + 150
        gen.wait_for("ready", deadline)
        _, begin = gen.wait_for("begin", deadline)
        timed.begin(begin)
        _, stop = gen.wait_for("stop", deadline)
        cpu = timed.end(stop)
        _, step = gen.wait_for("step", deadline)
        gen.say("quit")
        gen.finish()
    finally:
        server.stop()
    deliveries = step["deliveries_per_s"] * step["duration"]
    return {**cpu, "deliveries": deliveries, "lost": step["lost"], "p50_us": step["p50_us"],
            "cpu_per_delivery_us": 1e6 * cpu["server_s"] / max(deliveries, 1)}


def worker_pids_by_index(server: bench.Server) -> list[int]:
    """The workers' pids in the order they started: worker 0 first (none restarted in a run)."""
    def started(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    return sorted(bench.children_of(server.pid), key=lambda pid: (started(pid), pid))


def run_room(tls: tuple[str, str], hop: bool, args) -> dict:
    """One wss room with 2 workers: every client relayed (hop) or every client accepted by the room's worker."""
    room = "tlsroom"
    owner = scalesocket.worker_of(room, 2)
    server = start_server(2, tls)
    try:
        pids = worker_pids_by_index(server)
        stopped = pids[owner] if hop else pids[1 - owner]
        os.kill(stopped, signal.SIGSTOP)
        try:
            gen = bench.LoadGen("go", "roomrate", ["--url", url(server, True), "--room", room,
                                                   "--clients", str(args.room_clients), "--rate", str(args.room_rate),
                                                   "--duration", "4"], timeout=120)
            deadline = time.monotonic() + 60
            gen.wait_for("dialed", deadline)
        finally:
            os.kill(stopped, signal.SIGCONT)
        gen.say("go")
        gen.wait_for("ready", deadline)
        cpu, end = timed_phase(server, gen, deadline)
    finally:
        server.stop()
    return {**cpu, "deliveries": end["deliveries"],
            "cpu_per_delivery_us": 1e6 * cpu["server_s"] / max(end["deliveries"], 1)}


def certificate() -> tuple[str, str] | None:
    if shutil.which("openssl") is None:
        return None
    directory = tempfile.mkdtemp(prefix="bench-tls-")
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts, the first is the reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--rooms", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rate", type=float, default=1.0, help="manyrooms: messages/s per client")
    parser.add_argument("--room-clients", type=int, default=20)
    parser.add_argument("--room-rate", type=float, default=10.0)
    parser.add_argument("--no-tls", action="store_true")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--scalesocket", default=bench.SCALESOCKET, help="the scalesocket.py to run (default: the repository's)")
    args = parser.parse_args()
    global SCALESOCKET
    SCALESOCKET = os.path.abspath(args.scalesocket)
    bench.raise_nofile()
    if not bench.ensure_go_loadgen():
        return 1
    counts = [int(n) for n in args.workers.split(",")]
    results: dict = {"connections": {n: [] for n in counts}, "deliveries": {n: [] for n in counts},
                     "wss": {n: [] for n in (1, 2)}, "room": {"hop": [], "direct": []}, "load": []}
    tls = None if args.no_tls else certificate()
    for repeat in range(args.repeats):
        for n in counts:
            bench.log(f"repeat {repeat + 1}: --workers {n}: connections")
            results["connections"][n].append(run_connections(n, args))
            bench.log(f"repeat {repeat + 1}: --workers {n}: deliveries")
            results["deliveries"][n].append(run_deliveries(n, args))
        if tls:
            for n in (1, 2):
                bench.log(f"repeat {repeat + 1}: --workers {n}: wss connections")
                results["wss"][n].append(run_connections(n, args, tls))
            for how in ("hop", "direct"):
                bench.log(f"repeat {repeat + 1}: wss room, {how}")
                results["room"][how].append(run_room(tls, how == "hop", args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    ref = counts[0]
    print()
    print(f"Medians of {args.repeats} interleaved runs; CPU of the whole server tree (supervisor, workers, cats);"
          f" ratio to --workers {ref}.")
    print()
    print("| --workers | CPU/connection | ratio | connections/s | CPU/delivery | ratio | generator CPU (conn.) | other CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in counts:
        conn, dlv = results["connections"][n], results["deliveries"][n]
        c, d = median(conn, "cpu_per_conn_us"), median(dlv, "cpu_per_delivery_us")
        c1, d1 = median(results["connections"][ref], "cpu_per_conn_us"), median(results["deliveries"][ref], "cpu_per_delivery_us")
        gen = median(conn, "gen_s") / median(conn, "wall_s") * 100
        other = median(conn + dlv, "other_s") / median(conn + dlv, "wall_s") * 100
        print(f"| {n} | {c:.0f} µs | {c / c1:.2f}x | {median(conn, 'conn_per_s'):,.0f} | {d:.1f} µs | {d / d1:.2f}x"
              f" | {gen:.0f}% | {other:.0f}% |")
    if tls:
        w1, w2 = results["wss"][1], results["wss"][2]
        hop, direct = results["room"]["hop"], results["room"]["direct"]
        print()
        print("| wss, --workers | handshakes/s | ratio | CPU/connection |")
        print("| --- | --- | --- | --- |")
        for n, runs in ((1, w1), (2, w2)):
            print(f"| {n} | {median(runs, 'conn_per_s'):,.0f} | {median(runs, 'conn_per_s') / median(w1, 'conn_per_s'):.2f}x"
                  f" | {median(runs, 'cpu_per_conn_us'):.0f} µs |")
        print()
        print(f"wss room of {args.room_clients} clients at {args.room_rate:g} msg/s each, --workers 2: CPU/delivery"
              f" {median(direct, 'cpu_per_delivery_us'):.1f} µs when the room's worker accepted every client,"
              f" {median(hop, 'cpu_per_delivery_us'):.1f} µs when every client took the hop"
              f" ({median(hop, 'cpu_per_delivery_us') / median(direct, 'cpu_per_delivery_us'):.2f}x)")
    every = [r for group in ("connections", "deliveries", "wss") for runs in results[group].values() for r in runs]
    every += results["room"]["hop"] + results["room"]["direct"]
    print()
    print(f"Load average during the timed phases: {min(r['load'] for r in every):.2f} to {max(r['load'] for r in every):.2f};"
          f" failed connections: {sum(r.get('failed', 0) for r in every)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
