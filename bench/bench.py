"""Benchmark scalesocket.py against a websockets-library stand-in, a compiled (Go) one and websocketd.

    python3 bench/bench.py                      # full run (2-3 minutes on an idle machine)
    python3 bench/bench.py --quick              # short run (about a minute)
    python3 bench/bench.py --only rtt,fanout    # some workloads only
    python3 bench/bench.py --json /tmp/bench-results.json
    python3 bench/bench.py --profile fanout     # scalesocket.py under cProfile

Servers, all relaying through `cat` on 127.0.0.1 only:

* scalesocket.py  ``python3 scalesocket.py --ping 0 --maxclients 20000 cat``
  (the current file in the repository root);
* websockets      ``bench/ws_server.py cat``: the same job (rooms by path, one
  ``cat`` per room, lines broadcast to the room) on the `websockets` library,
  run from a venv at /tmp/bench-venv;
* websocketd      ``websocketd cat``: no rooms, one ``cat`` per connection, so
  it runs only where that is the same job (round trip, 1 MiB echo, new rooms,
  which for it is a new connection and its child) or where it is a fair
  yardstick anyway (handshakes, idle memory; both include a ``cat`` per
  connection for it). Other cells are "–";
* compiled (Go)   ``/tmp/bench-go/scalesocket-go cat``: the same job again, as
  one would write it in Go with gorilla/websocket (bench/go_server/main.go:
  each line framed once with a PreparedMessage, then queued to each client,
  whose own goroutine writes it out); bench.py builds it from Debian's
  golang-go and golang-github-gorilla-websocket-dev, and skips it when it
  cannot.

Workloads (the load generator is bench/loadgen.js: node, the `ws` package,
and bare clients on node's net module where ws's own cost per connection or
per message would make the load generator the bottleneck):

1. rtt        round trip of 64 B text through ``cat``, one client, sequential:
              msg/s and latency p50/p99 (µs).
2. fanout     100 clients in one room, one of them sends 2,000 messages at
              once: deliveries/s (100 × 2,000 / time until the last client has
              all) and lost messages (each client checks it got all, in order).
              The 99 receivers are bare clients in 2 processes. A run lasts a
              fraction of a second, so start-up latency weighs;
   fanout20k  the same with 20,000 messages, one run: the sustained rate.
3. big        1 MiB text messages echoed through ``cat``, sequential: MB/s.
4. handshake  2,000 connections (open, upgrade, close; 8 at once; bare
              clients) to one room whose child an "anchor" client keeps alive:
              connections/s.
5. idle       10,000 connections held in one room: the server's PSS
              (/proc/PID/smaps_rollup) before and after, KiB per connection,
              and whether all were held (and, with rooms, all got a broadcast;
              with websocketd, each got its echo). websocketd holds 4 fds per
              connection, so under a hard fd limit it gets fewer connections.
6. rooms      500 distinct rooms, 4 at once, each: connect, send, get the
              echo, close (a child spawned and stopped per room): rooms/s.

Beside each throughput figure is the server process's CPU use during the timed
phase (all its threads, from /proc/PID/task/*/schedstat): near 100% means a
Python server, one thread, is the bottleneck; the Go server runs on every
core (up to 200% on two). A second table gives the load generator's busiest
process, the server's children (cat) and everything else on the machine the
same way. The figures are only good on an otherwise idle
machine: before each run bench.py waits until the CPUs are idle (at most
--max-wait seconds in all) and it flags runs that shared the CPUs.

--set OPTION=VALUE overrides a load generator option for every workload
(``--set concurrency=32``); --profile WORKLOAD runs scalesocket.py alone under
``python3 -m cProfile``, stops it with SIGINT (it must exit 0 and write the
profile to /tmp/bench-prof-WORKLOAD.out) and prints the top 25 functions by
tottime, leaving out the event loop's idle wait in epoll.

Install (bench.py does each step itself when the thing is missing):

    cd bench && npm install                  # ws and bufferutil into bench/node_modules
    python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install websockets
    apt-get update && apt-get install -y websocketd     # optional; as root
    apt-get install -y golang-go golang-github-gorilla-websocket-dev   # optional; as root
    cd bench/go_server && GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off CGO_ENABLED=0 \
        GOCACHE=/tmp/bench-go/gocache go build -o /tmp/bench-go/scalesocket-go .   # redone when main.go is newer

Requires Linux (/proc), python3 >= 3.9, node >= 18; Go >= 1.19 (GOPATH mode,
no module download) for the compiled column.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import pstats
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
SCALESOCKET = os.path.join(REPO_DIR, "scalesocket.py")
LOADGEN = os.path.join(BENCH_DIR, "loadgen.js")
WS_SERVER = os.path.join(BENCH_DIR, "ws_server.py")
VENV = "/tmp/bench-venv"
VENV_PYTHON = os.path.join(VENV, "bin", "python")
GO_SOURCE = os.path.join(BENCH_DIR, "go_server", "main.go")
GO_DIR = "/tmp/bench-go"  # the build's output and cache; never in the repository
GO_BINARY = os.path.join(GO_DIR, "scalesocket-go")
GO_PATH = "/usr/share/gocode"  # where Debian's golang-*-dev packages put their sources
GO_PACKAGES = ["golang-go", "golang-github-gorilla-websocket-dev"]
NOFILE = 65536  # fd limit wanted for the servers and the load generator (idle holds 10,000)
WORKLOAD_TIMEOUT = 60  # seconds: all the runs of one workload on one server
RUN_LIMIT = 600  # seconds: no workload starts after this much of a whole run
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"  # every server listens, and every client connects, here only

SERVER_TITLES = {"scalesocket": "scalesocket.py", "websockets": "websockets", "websocketd": "websocketd",
                 "compiled": "compiled (Go)"}
SERVERS = list(SERVER_TITLES)


# --------------------------------------------------------------------------
# Workloads: what the load generator runs, how often, what is reported.
# --------------------------------------------------------------------------

@dataclass
class Workload:
    name: str
    title: str
    args: list[str]  # loadgen options, full run
    quick_args: list[str]  # loadgen options, --quick
    runs: int  # the median of this many runs is reported (full run)
    key: str  # figure of the "end" event that picks the median run
    servers: tuple[str, ...] = tuple(SERVERS)
    loadgen: str = ""  # loadgen.js workload, when not the same name


WORKLOADS = {w.name: w for w in [
    Workload("rtt", "round trip 64 B, 1 client",
             ["--count", "20000", "--warmup", "1000", "--size", "64"],
             ["--count", "3000", "--warmup", "300", "--size", "64"], runs=3, key="msg_per_s"),
    Workload("fanout", "fan-out 100 clients x 2,000 msgs",
             ["--clients", "100", "--messages", "2000", "--size", "64", "--procs", "2"],
             ["--clients", "100", "--messages", "2000", "--size", "64", "--procs", "2"],
             runs=5, key="deliveries_per_s", servers=("scalesocket", "websockets", "compiled")),
    Workload("fanout20k", "fan-out 100 clients x 20,000 msgs (sustained)",
             ["--clients", "100", "--messages", "20000", "--size", "64", "--procs", "2"],
             ["--clients", "100", "--messages", "5000", "--size", "64", "--procs", "2"],
             runs=1, key="deliveries_per_s", servers=("scalesocket", "websockets", "compiled"),
             loadgen="fanout"),
    Workload("big", "1 MiB text echo, 1 client",
             ["--count", "50", "--size", str(2**20)],
             ["--count", "20", "--size", str(2**20)], runs=3, key="mb_per_s"),
    Workload("handshake", "handshakes (open+upgrade+close)",
             ["--count", "2000", "--concurrency", "8"],
             ["--count", "500", "--concurrency", "8"], runs=3, key="per_s"),
    Workload("idle", "idle connections in one room",
             ["--count", "10000", "--concurrency", "100"],
             ["--count", "1000", "--concurrency", "100"], runs=1, key="opened"),
    Workload("rooms", "new rooms: spawn + first round trip",
             ["--count", "500", "--concurrency", "4"],
             ["--count", "100", "--concurrency", "4"], runs=1, key="per_s"),
]}


def with_option(args: list[str], opt: str, value: str) -> list[str]:
    """Load generator options with --opt set to value (replaced or appended)."""
    flag = f"--{opt}"
    if flag in args:
        i = args.index(flag)
        return args[:i + 1] + [value] + args[i + 2:]
    return args + [flag, value]


# --------------------------------------------------------------------------
# Setup: install what is missing.
# --------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_nofile() -> int:
    """Raise this process's fd limit, which the servers and node inherit; return it.

    Raising the hard limit needs CAP_SYS_RESOURCE, which root in a container
    may lack: then the soft limit goes up to the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, max(hard, NOFILE)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def idle_cap(kind: str) -> int | None:
    """How many idle connections a server can hold under the fd limit, if that binds.

    websocketd holds 4 fds per connection (the socket and cat's three pipes),
    more while it spawns (the load generator lets at most --concurrency spawn
    at once); the others hold one (their room's child is shared).
    """
    if kind != "websocketd":
        return None
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(100, (limit - 1000) // 4 // 250 * 250)


def ensure_node_ws() -> None:
    if shutil.which("node") is None:
        sys.exit("bench: node is required (node >= 18)")
    modules = os.path.join(BENCH_DIR, "node_modules")
    if not all(os.path.isdir(os.path.join(modules, m)) for m in ("ws", "bufferutil")):
        log("installing ws and bufferutil: npm install in bench/")
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=BENCH_DIR, check=True,
                       stdout=subprocess.DEVNULL)


def ensure_venv() -> bool:
    """Make the venv with websockets in it; False (and a warning) if that fails."""
    check = [VENV_PYTHON, "-c", "import websockets.asyncio.server"]
    if os.path.exists(VENV_PYTHON) and subprocess.run(check, capture_output=True).returncode == 0:
        return True
    log(f"creating {VENV} with websockets")
    try:
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([VENV_PYTHON, "-m", "pip", "install", "-q", "websockets>=13"], check=True)
        return subprocess.run(check, capture_output=True).returncode == 0
    except (subprocess.CalledProcessError, OSError) as exc:
        log(f"cannot set up the websockets venv ({exc}); skipping that server")
        return False


def ensure_websocketd() -> bool:
    """Install websocketd with apt when possible (root); False if it is not there."""
    if shutil.which("websocketd"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing websocketd with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
        if subprocess.run(["apt-get", "install", "-y", "-q", "websocketd"], **quiet).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], **quiet)
            subprocess.run(["apt-get", "install", "-y", "-q", "websocketd"], **quiet)
    if shutil.which("websocketd"):
        return True
    log("websocketd is not installed (apt-get install websocketd); skipping it")
    return False


def ensure_go_server() -> bool:
    """Build the Go stand-in (installing Go and gorilla/websocket with apt when
    missing, as root); False (and a log line) if it cannot be had.

    Built in GOPATH mode against Debian's sources, so nothing is downloaded;
    rebuilt whenever bench/go_server/main.go is newer than the binary.
    """
    if os.path.exists(GO_BINARY) and os.path.getmtime(GO_BINARY) >= os.path.getmtime(GO_SOURCE):
        return True
    gorilla = os.path.join(GO_PATH, "src", "github.com", "gorilla", "websocket")
    if (shutil.which("go") is None or not os.path.isdir(gorilla)) and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {' '.join(GO_PACKAGES)} with apt-get")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
        if subprocess.run(["apt-get", "install", "-y", "-q", *GO_PACKAGES], **quiet).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], **quiet)
            subprocess.run(["apt-get", "install", "-y", "-q", *GO_PACKAGES], **quiet)
    if shutil.which("go") is None or not os.path.isdir(gorilla):
        log(f"Go or gorilla/websocket is not installed (apt-get install {' '.join(GO_PACKAGES)});"
            " skipping the compiled server")
        return False
    log(f"building {GO_BINARY} from bench/go_server/main.go")
    os.makedirs(GO_DIR, exist_ok=True)
    env = dict(os.environ, GO111MODULE="off", GOPATH=GO_PATH, GOCACHE=os.path.join(GO_DIR, "gocache"),
               GOFLAGS="", GOPROXY="off", CGO_ENABLED="0")
    try:
        build = subprocess.run(["go", "build", "-o", GO_BINARY, "."], cwd=os.path.dirname(GO_SOURCE), env=env,
                               capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"cannot build the Go server ({exc}); skipping the compiled server")
        return False
    if build.returncode != 0:
        log(f"cannot build the Go server; skipping the compiled server:\n{build.stderr.strip()}")
        return False
    return True


# --------------------------------------------------------------------------
# /proc readings.
# --------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float | None:
    """CPU time a process has used, all its threads, in seconds (None once it is gone).

    From /proc/PID/task/*/schedstat (nanoseconds), not /proc/PID/stat
    (clock ticks): the fan-out runs last a fraction of a second.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return total / 1e9


def reaped_children_seconds(pid: int) -> float:
    """CPU time of a process's children that it has reaped (cutime + cstime), in seconds.

    This is how the short-lived children (a room's cat that came and went)
    are counted; the live ones are read directly.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / CLK_TCK


def pss_kib(pid: int) -> int | None:
    """Proportional set size of a process, in KiB."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def children_of(pid: int) -> list[int]:
    """Direct children of a process (the servers' cat processes), whichever thread forked them."""
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids += [int(p) for p in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return kids


def pss_with_children(pid: int, deadline: float) -> tuple[int, int]:
    """PSS of a process plus its children (KiB), and how many children it has.

    Bounded in time: past the deadline, the children not read yet are counted
    at the average of those read.
    """
    kids = children_of(pid)
    read, kids_total = 0, 0
    for kid in kids:
        if time.monotonic() > deadline:
            break
        kids_total += pss_kib(kid) or 0
        read += 1
    if read < len(kids):
        kids_total = kids_total * len(kids) // max(read, 1)
    return (pss_kib(pid) or 0) + kids_total, len(kids)


def machine_cpu_seconds() -> float:
    """CPU time all CPUs have spent busy since boot, in seconds (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK  # user..steal; guest time is inside user


def wait_for_quiet(budget: list[float], limit_pct: float = 25.0) -> float:
    """Wait (bounded by what is left of budget[0] seconds) until the machine is idle.

    Other work on the machine (another test suite, a build) takes CPU from the
    server and the load generator and skews every figure. Returns the last
    busy reading, in % of one core.
    """
    while True:
        t0, c0 = time.monotonic(), machine_cpu_seconds()
        time.sleep(0.5)
        busy = 100 * (machine_cpu_seconds() - c0) / (time.monotonic() - t0)
        if busy < limit_pct or budget[0] <= 0:
            return busy
        if budget[0] >= 0.5:
            log(f"machine busy ({busy:.0f}% of a core used by other processes); waiting (up to {budget[0]:.0f} s more)")
        budget[0] -= 0.5 + 2
        time.sleep(2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# Servers.
# --------------------------------------------------------------------------

class Server:
    """One server process on 127.0.0.1, started for one workload."""

    def __init__(self, kind: str, tag: str, profile_out: str | None = None) -> None:
        self.kind = kind
        self.log_path = f"/tmp/bench-{kind}-{tag}.log"
        self.port: int | None = None
        if kind == "scalesocket":
            script = [SCALESOCKET]
            if profile_out:
                script = ["-m", "cProfile", "-o", profile_out, SCALESOCKET]
            argv = [sys.executable, *script, "--addr", f"{HOST}:0", "--ping", "0", "--maxclients", "20000", "cat"]
        elif kind == "websockets":
            argv = [VENV_PYTHON, WS_SERVER, "--addr", f"{HOST}:0", "cat"]
        elif kind == "compiled":
            argv = [GO_BINARY, "--addr", f"{HOST}:0", "cat"]
        else:
            self.port = free_port()
            argv = ["websocketd", f"--port={self.port}", f"--address={HOST}", "--loglevel=error", "cat"]
        self.logfile = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logfile, stderr=subprocess.STDOUT,
                                     cwd=REPO_DIR)
        self.pid = self.proc.pid
        self._wait_listening()

    def _wait_listening(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}; see {self.log_path}")
            if self.port is None:
                with open(self.log_path) as f:
                    for line in f:
                        if "listening on " in line:
                            self.port = int(line.rsplit(":", 1)[1].split()[0])
            if self.port is not None:
                try:
                    socket.create_connection((HOST, self.port), timeout=1).close()
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.kind} did not start listening in {timeout} s; see {self.log_path}")

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    def stop(self, timeout: float = 15) -> int | None:
        """SIGINT, then SIGKILL if it has not exited in time; return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.kind} ignored SIGINT for {timeout} s; killing it")
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()
        return self.proc.returncode


# --------------------------------------------------------------------------
# One run of a workload against a server.
# --------------------------------------------------------------------------

class LoadGen:
    """node loadgen.js, with its JSON-line events read by a thread as they come."""

    def __init__(self, workload: str, args: list[str], timeout: float) -> None:
        self.proc = subprocess.Popen(["node", LOADGEN, workload, *args, "--timeout", f"{timeout:.0f}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=BENCH_DIR, text=True)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.put((time.monotonic(), json.loads(line)))
            except json.JSONDecodeError:
                log(f"loadgen: {line.rstrip()}")
        self.events.put((time.monotonic(), None))

    def next_event(self, deadline: float) -> tuple[float, dict | None]:
        try:
            return self.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return time.monotonic(), None

    def say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_once(server: Server, workload: Workload, args: list[str], timeout: float) -> dict:
    """Run the load generator once; return its "end" figures plus CPU and memory.

    The load generator stops by itself after ``timeout`` seconds (reporting
    what it has); past that and a grace period, it is killed.
    """
    extra = []
    if workload.name == "handshake" and server.kind != "websocketd":
        extra.append("--anchor")
    if workload.name == "idle":
        extra.append("--broadcast" if server.kind != "websocketd" else "--echo")
    cap = idle_cap(server.kind) if workload.name == "idle" else None
    if cap is not None and int(args[args.index("--count") + 1]) > cap:
        log(f"{server.kind}: {cap} idle connections at most under the fd limit "
            f"({resource.getrlimit(resource.RLIMIT_NOFILE)[0]}; it holds 4 per connection)")
        args = with_option(args, "count", str(cap))
    result: dict = {}
    pss_before = pss_kib(server.pid)
    gen = LoadGen(workload.loadgen or workload.name, ["--url", server.url, *args, *extra], timeout)
    deadline = time.monotonic() + timeout + 45  # its own hard stop is at timeout + 30
    begin = None
    while True:
        t, ev = gen.next_event(deadline)
        if ev is None:
            result.setdefault("error", "load generator ended without a result")
            break
        if ev["ev"] == "begin":
            pids = ev["pids"]
            kids = children_of(server.pid)  # the room's cat, when there is one
            begin = (t, cpu_seconds(server.pid), {p: cpu_seconds(p) for p in pids},
                     {k: cpu_seconds(k) for k in kids}, reaped_children_seconds(server.pid),
                     machine_cpu_seconds())
        elif ev["ev"] == "opened":  # idle: every connection is open now
            time.sleep(1.0)  # let the server settle
            result["pss_before_kib"] = pss_before
            result["pss_after_kib"] = pss_kib(server.pid)
            result["pss_children_after_kib"], result["children"] = pss_with_children(
                server.pid, time.monotonic() + 20)
            gen.say("go")
        elif ev["ev"] == "end":
            if begin is not None:
                t0, srv0, gen0, kids0, reaped0, machine0 = begin
                wall = max(t - t0, 1e-9)
                used = lambda pid, c0: (cpu_seconds(pid) or c0) - c0 if c0 is not None else 0.0
                srv = used(server.pid, srv0)
                loadgen = [used(p, c0) for p, c0 in gen0.items()]
                # Children: those alive at the start, and those reaped meanwhile.
                kids = (sum(used(k, c0) for k, c0 in kids0.items())
                        + reaped_children_seconds(server.pid) - reaped0)
                machine = machine_cpu_seconds() - machine0
                result["server_cpu_pct"] = 100 * srv / wall
                result["loadgen_cpu_pct"] = 100 * max(loadgen) / wall if loadgen else None
                result["loadgen_cpu_pct_all"] = [100 * g / wall for g in loadgen]
                result["children_cpu_pct"] = 100 * kids / wall
                # Whatever else ran meanwhile (other processes, and the kernel
                # work not charged to ours): high values make the figures suspect.
                result["other_cpu_pct"] = max(0.0, 100 * (machine - srv - sum(loadgen) - kids) / wall)
            result.update({k: v for k, v in ev.items() if k != "ev"})
            break
    gen.finish()
    if workload.name == "idle" and "pss_after_kib" in result and result.get("opened"):
        n = result["opened"]
        result["kib_per_conn"] = (result["pss_after_kib"] - pss_before) / n
        result["kib_per_conn_children"] = (result["pss_children_after_kib"] - pss_before) / n
    return result


def run_workload(kind: str, workload: Workload, quick: bool, budget: list[float],
                 profile_out: str | None = None) -> dict:
    """Start a server, run the workload (its runs), stop the server; the median run.

    The runs share WORKLOAD_TIMEOUT seconds, not counting the waits for a
    quiet machine: budget[0] is how long, in all, those may still take.
    """
    args = workload.quick_args if quick else workload.args
    runs = 1 if quick or profile_out else workload.runs
    server = Server(kind, workload.name, profile_out)
    results = []
    end = time.monotonic() + WORKLOAD_TIMEOUT  # the runs share this; waiting for quiet aside
    try:
        for i in range(runs):
            waited = time.monotonic()
            busy = wait_for_quiet(budget)
            end += time.monotonic() - waited  # waiting for a quiet machine does not count
            left = end - time.monotonic()
            if results and left < 5:
                log(f"{kind} {workload.name}: out of time after {i} runs")
                break
            r = run_once(server, workload, args, max(left, 5))
            r["busy_before_pct"] = busy
            results.append(r)
            log(f"{kind} {workload.name} run {i + 1}/{runs}: " + summary(workload, r))
            if "error" in r:
                break
            time.sleep(0.3)  # let the room empty and its child stop between runs
    finally:
        status = server.stop()
    ok = [r for r in results if workload.key in r and "error" not in r]
    if ok:
        ok.sort(key=lambda r: r[workload.key])
        median = dict(ok[(len(ok) - 1) // 2])
        for k in ("p50_us", "p99_us"):  # latencies: the median of each, run by run
            if all(k in r for r in ok):
                median[k] = statistics.median(r[k] for r in ok)
    else:
        median = results[-1] if results else {"error": "no run"}
    median["exit_status"] = status
    return {"runs": results, "median": median, "server_log": server.log_path}


def summary(workload: Workload, r: dict) -> str:
    """One line on a run, for the log."""
    if "error" in r:
        return f"ERROR {r['error']}"
    if r.get("timeout"):
        return "TIMEOUT (partial figures) " + summary(workload, {k: v for k, v in r.items() if k != "timeout"})
    cpu = (f" | cpu: server {r.get('server_cpu_pct', 0):.0f}% loadgen {r.get('loadgen_cpu_pct') or 0:.0f}%"
           f" child {r.get('children_cpu_pct', 0):.0f}% other {r.get('other_cpu_pct', 0):.0f}%")
    if workload.name == "rtt":
        return f"{r['msg_per_s']:,.0f} msg/s p50 {r['p50_us']:.0f} µs p99 {r['p99_us']:.0f} µs" + cpu
    if workload.name.startswith("fanout"):
        return f"{r['deliveries_per_s']:,.0f} deliveries/s lost {r['lost']} out-of-order {r['out_of_order']}" + cpu
    if workload.name == "big":
        return f"{r['mb_per_s']:.1f} MB/s bad {r['bad']}" + cpu
    if workload.name == "idle":
        return (f"{r.get('kib_per_conn', 0):.1f} KiB/conn, opened {r['opened']}/{r['requested']} "
                f"held {r['held']} reached {r['reached']}")
    return f"{r['per_s']:,.0f}/s failed {r['failed']}" + cpu


# --------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------

def fmt_num(value: float | None) -> str:
    if value is None:
        return "?"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


# (workload, row label, figure of the median run, show the server CPU beside it)
ROWS = [
    ("rtt", "round trip 64 B: msg/s", "msg_per_s", True),
    ("rtt", "round trip 64 B: p50 µs (lower is better)", "p50_us", False),
    ("rtt", "round trip 64 B: p99 µs (lower is better)", "p99_us", False),
    ("fanout", "fan-out 100x2000: deliveries/s", "deliveries_per_s", True),
    ("fanout", "fan-out 100x2000: lost msgs", "lost", False),
    ("fanout20k", "fan-out 100x{messages} sustained: deliveries/s", "deliveries_per_s", True),
    ("fanout20k", "fan-out 100x{messages} sustained: lost msgs", "lost", False),
    ("big", "1 MiB echo: MB/s", "mb_per_s", True),
    ("handshake", "handshakes: conn/s", "per_s", True),
    ("idle", "idle: KiB/conn, server (lower is better)", "kib_per_conn", False),
    ("idle", "idle: KiB/conn with children", "kib_per_conn_children", False),
    ("idle", "idle: connections held", "held", False),
    ("rooms", "new rooms: rooms/s", "per_s", True),
]


def cell(res: dict | None, figure: str, cpu: bool) -> str:
    if res is None:
        return "–"
    m = res["median"]
    if "error" in m and figure not in m:
        return "error"
    if figure == "held":
        reached = m.get("reached")
        text = f"{m.get('held', 0)}/{m.get('requested', '?')}"
        return text + (f" (bcast {reached})" if reached is not None else "")
    if figure == "lost":
        return f"{m.get('lost')} (order {m.get('out_of_order')})"
    text = fmt_num(m.get(figure))
    if cpu and m.get("server_cpu_pct") is not None:
        text += f" ({m['server_cpu_pct']:.0f}%)"
    return text


def ratio(a: dict | None, b: dict | None, figure: str) -> str:
    if a is None or b is None or figure in ("held", "lost"):
        return "–"
    x, y = a["median"].get(figure), b["median"].get(figure)
    if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or y == 0:
        return "–"
    return f"{x / y:.2f}x"


def print_table(results: dict, quick: bool) -> None:
    header = ["workload", *SERVER_TITLES.values(), "ss/websockets", "ss/websocketd", "ss/compiled"]
    rows = []
    for name, label, figure, cpu in ROWS:
        if name not in results:
            continue
        per = results[name]
        first = next(iter(per.values()), {}).get("median", {})
        if name == "idle":  # the label says how many
            n = first.get("requested")
            label = label.replace("idle:", f"idle {n:,}:" if n else "idle:")
        if "{messages}" in label:
            label = label.format(messages=f"{first['expected'] // first['clients']:,}" if first.get("clients") else "N")
        rows.append([label] + [cell(per.get(s), figure, cpu) for s in SERVERS]
                    + [ratio(per.get("scalesocket"), per.get("websockets"), figure),
                       ratio(per.get("scalesocket"), per.get("websocketd"), figure),
                       ratio(per.get("scalesocket"), per.get("compiled"), figure)])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print()
    print(f"Results ({'quick' if quick else 'full'} run; medians; (N%) = server CPU during the timed phase,"
          " 100% = one core busy)")
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    # Where the CPU went: is the server saturated, or the load generator, or
    # did something else on the machine take a share?
    print()
    print("CPU during the timed phase, % of one core: server / load generator's busiest process /"
          " the server's children (cat) / everything else on the machine")
    noisy = []
    for name in WORKLOADS:
        if name not in results or name == "idle":
            continue
        cells = []
        for s in SERVERS:
            m = results[name].get(s, {}).get("median", {})
            if m.get("server_cpu_pct") is None:
                cells.append(f"{s} –")
                continue
            cells.append(f"{s} {m['server_cpu_pct']:.0f}/{m.get('loadgen_cpu_pct') or 0:.0f}"
                         f"/{m.get('children_cpu_pct', 0):.0f}/{m.get('other_cpu_pct', 0):.0f}")
            if m.get("other_cpu_pct", 0) > 30:
                noisy.append(f"{name}/{s}")
        print(f"  {name:<10} " + "   ".join(c.ljust(30) for c in cells).rstrip())
    if noisy:
        print(f"WARNING: other processes used over 30% of a core during {', '.join(noisy)}: those figures are skewed")
    # scalesocket.py must exit cleanly (status 0) on SIGINT, after every workload.
    statuses = {name: per["scalesocket"]["median"].get("exit_status")
                for name, per in results.items() if "scalesocket" in per}
    if statuses:
        bad = {k: v for k, v in statuses.items() if v != 0}
        print("scalesocket.py exit status after SIGINT: " + ("0 after every workload" if not bad else
              ", ".join(f"{k}: {v}" for k, v in bad.items()) + " (expected 0)"))
    bad = {name: per["compiled"]["median"].get("exit_status") for name, per in results.items()
           if "compiled" in per and per["compiled"]["median"].get("exit_status") != 0}
    if bad:
        print("compiled (Go) exit status after SIGINT: " + ", ".join(f"{k}: {v}" for k, v in bad.items())
              + " (expected 0)")
    print()


# --------------------------------------------------------------------------
# Profiling.
# --------------------------------------------------------------------------

def profile(workload: Workload, quick: bool, max_wait: float) -> dict:
    out = f"/tmp/bench-prof-{workload.name}.out"
    if os.path.exists(out):
        os.unlink(out)
    log(f"profiling scalesocket.py on {workload.name} (cProfile slows it: figures are not comparable)")
    res = run_workload("scalesocket", workload, quick, [max_wait], profile_out=out)
    status = res["median"]["exit_status"]
    print(f"\nscalesocket.py exited with status {status} after SIGINT"
          + ("" if status == 0 else " (expected 0: a clean shutdown)"))
    if not os.path.exists(out):
        print(f"no profile written to {out}")
        return res
    print(f"profile: {out}; {workload.name}: {summary(workload, res['median'])}\n")
    stats = pstats.Stats(out, stream=sys.stdout)
    # cProfile's clock is wall time: the event loop's wait in epoll is idle
    # time, not work. Take it out so the table shows where the CPU went.
    for key in [k for k in stats.stats if k[2] in ("<method 'poll' of 'select.epoll' objects>",
                                                    "<method 'select' of 'select.epoll' objects>")]:
        wait = stats.stats.pop(key)[2]
        stats.total_tt -= wait
        print(f"(left out: {wait:.2f} s waiting in epoll, i.e. idle)")
    stats.strip_dirs().sort_stats("tottime").print_stats(25)
    return res


# --------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark scalesocket.py against websockets, a compiled (Go) server and websocketd"
                    " (details: the module docstring).",
        epilog="workloads: " + "; ".join(f"{w.name}: {w.title}" for w in WORKLOADS.values()))
    parser.add_argument("--quick", action="store_true", help="short run: smaller counts, one run each")
    parser.add_argument("--only", metavar="WORKLOAD[,...]", help=f"run only these: {', '.join(WORKLOADS)}")
    parser.add_argument("--servers", metavar="NAME[,...]", default=",".join(SERVERS),
                        help=f"servers to run (default: {','.join(SERVERS)})")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures of every run to FILE")
    parser.add_argument("--set", metavar="OPTION=VALUE", action="append", default=[],
                        help="override a load generator option, e.g. --set concurrency=32 (repeatable)")
    parser.add_argument("--max-wait", metavar="SECONDS", type=float, default=120,
                        help="at most this long in all, wait for other processes to leave the CPUs idle"
                             " before each run (default 120)")
    parser.add_argument("--profile", metavar="WORKLOAD",
                        help="run scalesocket.py under cProfile on WORKLOAD; print the top 25 by tottime")
    args = parser.parse_args()

    names = list(WORKLOADS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
    if args.profile:
        names = [args.profile]
    for n in names:
        if n not in WORKLOADS:
            parser.error(f"unknown workload {n!r}; choose from {', '.join(WORKLOADS)}")
    servers = [s.strip() for s in args.servers.split(",")]
    for s in servers:
        if s not in SERVERS:
            parser.error(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")
    if not os.path.exists(SCALESOCKET):
        sys.exit(f"bench: {SCALESOCKET} not found")

    for item in args.set:
        opt, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set wants OPTION=VALUE, not {item!r}")
        for wl in WORKLOADS.values():
            wl.args, wl.quick_args = with_option(wl.args, opt, value), with_option(wl.quick_args, opt, value)

    nofile = raise_nofile()
    if nofile < NOFILE:
        log(f"fd limit is {nofile} (the hard limit; raising it needs CAP_SYS_RESOURCE)")
    ensure_node_ws()
    if args.profile:
        res = profile(WORKLOADS[args.profile], args.quick, args.max_wait)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"profile": args.profile, "result": res}, f, indent=1)
        return 0
    if "websockets" in servers and not ensure_venv():
        servers.remove("websockets")
    if "websocketd" in servers and not ensure_websocketd():
        servers.remove("websocketd")
    if "compiled" in servers and not ensure_go_server():
        servers.remove("compiled")

    started = time.monotonic()
    budget = [args.max_wait]  # seconds the whole run may spend waiting for a quiet machine
    results: dict = {}
    for name in names:
        wl = WORKLOADS[name]
        results[name] = {}
        for kind in servers:
            if kind not in wl.servers:
                continue
            if time.monotonic() - started > RUN_LIMIT:
                log(f"skipping {kind} {name}: the run has taken over {RUN_LIMIT} s")
                continue
            try:
                results[name][kind] = run_workload(kind, wl, args.quick, budget)
            except RuntimeError as exc:
                log(f"{kind} {name}: {exc}")
                results[name][kind] = {"runs": [], "median": {"error": str(exc)}}
    elapsed = time.monotonic() - started

    print_table(results, args.quick)
    print(f"took {elapsed:.0f} s")
    if args.json:
        meta = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "quick": args.quick,
            "python": platform.python_version(),
            "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip(),
            "cpus": os.cpu_count(),
            "git": subprocess.run(["git", "-C", REPO_DIR, "rev-parse", "HEAD"], capture_output=True,
                                  text=True).stdout.strip(),
            "elapsed_s": elapsed,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        log(f"raw figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
