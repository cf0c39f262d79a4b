"""Benchmark scalesocket.py against a websockets-library stand-in, a compiled (Go) one and websocketd.

    python3 bench/bench.py                      # full run (4-6 minutes on an idle machine)
    python3 bench/bench.py --quick              # short run (2-3 minutes)
    python3 bench/bench.py --only rtt,fanout    # some workloads only
    python3 bench/bench.py --json /tmp/bench-results.json
    python3 bench/bench.py --profile fanout     # scalesocket.py under cProfile

    # many rooms, scalesocket.py without --workers against --workers 2, side by side
    # (the first server listed is the one the ratio columns compare):
    python3 bench/bench.py --only manyrooms --servers scalesocket,scalesocket-w2
    # or more options for every scalesocket.py server (and its variants):
    python3 bench/bench.py --only manyrooms --servers scalesocket --server-args "--workers 2"
    # other rates, step by step (messages/s per client; the first is the reference):
    python3 bench/bench.py --only manyrooms --rates 1,2,4,8,16 --p99-limit 50

Servers, all relaying through `cat` on 127.0.0.1 only:

* scalesocket.py  ``python3 scalesocket.py --ping 0 --maxclients 20000 cat``
  (the current file in the repository root, or --scalesocket FILE); with
  --server-args "ARGS", ARGS go before ``cat`` (split as a shell would);
* scalesocket-wN  (any N: scalesocket-w1, scalesocket-w2, ...) the same with
  ``--workers N`` too, so that variants run side by side, each a column;
  asked for with --servers only;
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
  whose own goroutine writes it out).

Load generators:

* bench/go_loadgen/main.go, built to /tmp/bench-go/bench-loadgen, runs every
  workload: rtt and big with one gorilla/websocket client; handshake, rooms,
  fanout, fanout20k, idle and manyrooms with bare clients (a fixed upgrade
  request on a TCP connection, masked frames out, a minimal frame parser
  in), those of fanout, idle and manyrooms read by one thread waiting in
  epoll (--set pollers=N for more), a read per ready socket and a short
  pause between rounds, so that each wake-up finds much to read and the
  load generator is not what limits;
* bench/loadgen.js (node, the `ws` package and bare clients on node's net
  module; fanout's receivers in 2 node processes) has the same workloads,
  options and figures but manyrooms: it runs them when Go cannot be had, or
  with --loadgen node (manyrooms is then skipped).

Both Go programs are built in GOPATH mode against Debian's golang-go and
golang-github-gorilla-websocket-dev (bench.py installs them with apt-get when
missing, as root), so nothing is downloaded; each is rebuilt whenever its
main.go is newer than the binary. Without Go, the compiled server is skipped.

Workloads:

1. rtt        round trip of 64 B text through ``cat``, one client, sequential:
              msg/s and latency p50/p99 (µs).
2. fanout     100 clients in one room, one of them sends 2,000 messages at
              once: deliveries/s (100 × 2,000 / time until the last client has
              all) and lost messages (each client checks it got all, in order).
              The receivers are bare clients; with Go, the time each got its
              last message is the kernel's (SO_TIMESTAMPNS: when it reached
              the client's socket), so the load generator's own delays do not
              count; with node, when node handled it. A run lasts a fraction
              of a second, so start-up latency weighs;
   fanout20k  the same with 20,000 messages, one run: the sustained rate.
3. big        1 MiB text messages echoed through ``cat``, sequential: MB/s.
4. handshake  2,000 connections (open, upgrade, close; 8 at once; bare
              clients) to one room whose child an "anchor" client keeps alive:
              connections/s.
5. idle       10,000 connections held in one room: the server's PSS
              (/proc/PID/smaps_rollup; with worker processes, theirs too)
              before and after, KiB per connection, and whether all were held
              (and, with rooms, all got a broadcast; with websocketd, each got
              its echo). websocketd holds 4 fds per connection, so under a
              hard fd limit it gets fewer connections. Bare clients with Go,
              `ws` clients with node.
6. rooms      500 distinct rooms, 4 at once, each: connect, send, get the
              echo, close (a child spawned and stopped per room): rooms/s.
7. manyrooms  40 rooms × 25 clients (bare, connected once for all the
              steps), each room with its ``cat``; the rooms are room0 to
              room39 in every run, so with --workers each worker owns the
              same rooms every time (19 and 21 of them with two); every client sends 64 B
              messages at a fixed rate, each broadcast by the room's cat to
              the 25 clients of the room (the sender too) and carrying its
              send time. The rate goes up step by step (--rates, messages/s
              per client; each step: 1 s to settle, 3 s measured, up to 3 s
              for the stragglers; --quick: 0.5 s and 2 s) until the server
              saturates: deliveries/s under 90% of the offered rate
              (rate × 1,000 clients × 25), p99 latency over --p99-limit
              (100 ms), over 0.1% of the deliveries lost (not there 3 s after
              the step) or a connection closed (a step that saturates while
              other processes take over 30% of a core runs again, once).
              Reported: the most deliveries/s of any step (at saturation, if
              reached) and the rate that saturated; at the first rate (the
              reference, low enough for any configuration to carry: compare
              there) deliveries/s, latency p50/p99 (from the send to the
              arrival in each other client's socket: the kernel's receive
              timestamp, so the load generator's own delays do not count),
              the server's CPU per delivery and, apart, its cat children's;
              the server's CPU per delivery at the peak; and, with several
              worker processes (--workers), the busiest one's CPU and its
              share of the workers' (50% with two evenly loaded). A second
              table gives every step.

CPU: the server's CPU is that of its process and all its descendants (all
their threads, from /proc/PID/task/*/schedstat) but the room children, the
``cat`` processes, which are counted apart (the live ones read directly, the
ones that came and went through their parents' cutime). With --workers, the
server is the supervisor and its worker processes. Beside each throughput
figure in the table is "(S% gG%)": the server's and the load generator's CPU
during the timed phase, in % of one core. The load generator's is its busiest
process, all threads (the Go one reports its own, from getrusage, as it may
be exiting when bench.py would read /proc). Near 100% for a Python server
(one thread) means it is the bottleneck; the Go server and the Go load
generator run on every core (up to 200% on two), but the reads of fanout and
manyrooms are done by one thread (--set pollers=N for more), whose CPU the
log's lines (fanout) and the steps table (manyrooms) show: near 100%, the
load generator may be what limits, and manyrooms' saturation reason says so.
node's load generator is saturated near 100%. A second table gives the
server / load generator / children / everything else on the machine. The figures are only good on an otherwise idle machine:
before each run bench.py waits until the CPUs are idle (at most --max-wait
seconds in all) and it flags runs that shared the CPUs.

--set OPTION=VALUE overrides a load generator option for every workload whose
load generator takes it (``--set concurrency=32``), --set WORKLOAD.OPTION=VALUE
for one workload (``--set manyrooms.clients=10``); --profile WORKLOAD runs
scalesocket.py alone under ``python3 -m cProfile``, stops it with SIGINT (it
must exit 0 and write the profile to /tmp/bench-prof-WORKLOAD.out) and prints
the top 25 functions by tottime, leaving out the event loop's idle wait in
epoll.

Install (bench.py does each step itself when the thing is missing):

    cd bench && npm install                  # ws and bufferutil into bench/node_modules
    python3 -m venv /tmp/bench-venv && /tmp/bench-venv/bin/pip install websockets
    apt-get update && apt-get install -y websocketd     # optional; as root
    apt-get install -y golang-go golang-github-gorilla-websocket-dev   # optional; as root
    export GO111MODULE=off GOPATH=/usr/share/gocode GOPROXY=off CGO_ENABLED=0 GOCACHE=/tmp/bench-go/gocache
    (cd bench/go_server && go build -o /tmp/bench-go/scalesocket-go .)   # each redone when
    (cd bench/go_loadgen && go build -o /tmp/bench-go/bench-loadgen .)   # its main.go is newer

Requires Linux (/proc), python3 >= 3.9, node >= 18 (for the node load generator);
Go >= 1.19 (GOPATH mode, no module download) for the compiled server and the
Go load generator.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import pstats
import queue
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
SCALESOCKET = os.path.join(REPO_DIR, "scalesocket.py")
LOADGEN = os.path.join(BENCH_DIR, "loadgen.js")
WS_SERVER = os.path.join(BENCH_DIR, "ws_server.py")
VENV = "/tmp/bench-venv"
VENV_PYTHON = os.path.join(VENV, "bin", "python")
GO_DIR = "/tmp/bench-go"  # the builds' output and cache; never in the repository
GO_SERVER_DIR = os.path.join(BENCH_DIR, "go_server")  # sources: DIR/main.go
GO_SERVER = os.path.join(GO_DIR, "scalesocket-go")
GO_LOADGEN_DIR = os.path.join(BENCH_DIR, "go_loadgen")
GO_LOADGEN = os.path.join(GO_DIR, "bench-loadgen")
GO_PATH = "/usr/share/gocode"  # where Debian's golang-*-dev packages put their sources
GO_PACKAGES = ["golang-go", "golang-github-gorilla-websocket-dev"]
NOFILE = 65536  # fd limit wanted for the servers and the load generator (idle holds 10,000)
WORKLOAD_TIMEOUT = 60  # seconds: all the runs of one workload on one server (by default)
RUN_LIMIT = 600  # seconds: no workload starts after this much of a whole run
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"  # every server listens, and every client connects, here only
ROOM_CMD = "cat"  # every server's room child; its processes are counted apart from the server's

SERVER_TITLES = {"scalesocket": "scalesocket.py", "websockets": "websockets", "websocketd": "websocketd",
                 "compiled": "compiled (Go)"}
SERVERS = list(SERVER_TITLES)  # the default run; scalesocket-wN are asked for by name
WORKERS_VARIANT = re.compile(r"scalesocket-w([1-9][0-9]*)")


def server_base(kind: str) -> str:
    """The server a name stands for: scalesocket-wN is scalesocket.py."""
    return "scalesocket" if WORKERS_VARIANT.fullmatch(kind) else kind


def server_title(kind: str) -> str:
    variant = WORKERS_VARIANT.fullmatch(kind)
    return f"scalesocket.py -w{variant[1]}" if variant else SERVER_TITLES[kind]


# --------------------------------------------------------------------------
# Workloads: what the load generator runs, how often, what is reported.
# --------------------------------------------------------------------------

# The options each load generator takes (so that --set goes only where it fits).
GO_OPTIONS = {"url", "room", "count", "size", "warmup", "concurrency", "anchor", "timeout", "messages", "window",
              "broadcast", "echo", "rooms", "clients", "rate", "duration", "settle", "drain", "pollers", "batch"}
NODE_OPTIONS = {"url", "room", "count", "size", "warmup", "clients", "messages", "procs", "window",
                "concurrency", "anchor", "broadcast", "echo", "client", "timeout"}


@dataclass
class Workload:
    name: str
    title: str
    args: list[str]  # load generator options, full run
    quick_args: list[str]  # load generator options, --quick
    runs: int  # the median of this many runs is reported (full run)
    key: str  # figure of the "end" event that picks the median run
    servers: tuple[str, ...] = tuple(SERVERS)
    loadgen: str = ""  # the load generator's workload, when not the same name
    generators: tuple[str, ...] = ("go", "node")  # load generators that have it, the preferred first
    generator: str = ""  # the one this run uses (set in main)
    # More options for one load generator only (added to args and quick_args once it is chosen).
    generator_args: dict[str, list[str]] = field(default_factory=dict)
    timeout: float = WORKLOAD_TIMEOUT  # seconds: all the runs on one server
    rates: tuple[float, ...] = ()  # manyrooms: messages/s per client, step by step (full run)
    quick_rates: tuple[float, ...] = ()  # the same, --quick
    p99_limit_ms: float = 100  # manyrooms: a step whose p99 latency is over this is saturated


WORKLOADS = {w.name: w for w in [
    Workload("rtt", "round trip 64 B, 1 client",
             ["--count", "20000", "--warmup", "1000", "--size", "64"],
             ["--count", "3000", "--warmup", "300", "--size", "64"], runs=3, key="msg_per_s"),
    Workload("fanout", "fan-out 100 clients x 2,000 msgs",
             ["--clients", "100", "--messages", "2000", "--size", "64"],
             ["--clients", "100", "--messages", "2000", "--size", "64"],
             runs=5, key="deliveries_per_s", servers=("scalesocket", "websockets", "compiled"),
             generator_args={"node": ["--procs", "2"]}),
    Workload("fanout20k", "fan-out 100 clients x 20,000 msgs (sustained)",
             ["--clients", "100", "--messages", "20000", "--size", "64"],
             ["--clients", "100", "--messages", "5000", "--size", "64"],
             runs=1, key="deliveries_per_s", servers=("scalesocket", "websockets", "compiled"),
             loadgen="fanout", generator_args={"node": ["--procs", "2"]}),
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
    Workload("manyrooms", "40 rooms x 25 clients, rate raised to saturation",
             ["--rooms", "40", "--clients", "25", "--room", "room", "--size", "64", "--settle", "1",
              "--duration", "3", "--drain", "3", "--concurrency", "16"],
             ["--rooms", "40", "--clients", "25", "--room", "room", "--size", "64", "--settle", "0.5",
              "--duration", "2", "--drain", "3", "--concurrency", "16"],
             runs=1, key="deliveries_per_s", servers=("scalesocket", "websockets", "compiled"),
             generators=("go",), timeout=150,
             rates=(1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
             quick_rates=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32)),
]}

# manyrooms: a step is saturated when deliveries/s falls under this share of
# the offered rate, or more than this share of its messages are lost.
FOLLOW_RATIO = 0.9
LOST_RATIO = 0.001
POLLER_BUSY_PCT = 90  # a load generator thread this busy (% of a core) may be what limits
NOISY_PCT = 30  # other processes that took this much CPU (% of a core) during a run skewed it


def with_option(args: list[str], opt: str, value: str) -> list[str]:
    """Load generator options with --opt set to value (replaced or appended)."""
    flag = f"--{opt}"
    if flag in args:
        i = args.index(flag)
        return args[:i + 1] + [value] + args[i + 2:]
    return args + [flag, value]


def generator_options(generator: str) -> set[str]:
    return GO_OPTIONS if generator == "go" else NODE_OPTIONS


# --------------------------------------------------------------------------
# Setup: install what is missing.
# --------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_nofile() -> int:
    """Raise this process's fd limit, which the servers and the load generator inherit; return it.

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
        sys.exit("bench: node is required for the node load generator (node >= 18)")
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


def apt_install(packages: list[str]) -> None:
    """apt-get install, quietly, with an apt-get update first if that fails (root only)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    log(f"installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    if subprocess.run(["apt-get", "install", "-y", "-q", *packages], **quiet).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], **quiet)
        subprocess.run(["apt-get", "install", "-y", "-q", *packages], **quiet)


def ensure_websocketd() -> bool:
    """Install websocketd with apt when possible (root); False if it is not there."""
    if not shutil.which("websocketd"):
        apt_install(["websocketd"])
    if shutil.which("websocketd"):
        return True
    log("websocketd is not installed (apt-get install websocketd); skipping it")
    return False


def ensure_go_binary(source_dir: str, binary: str, what: str) -> bool:
    """Build one of the Go programs (installing Go and gorilla/websocket with apt
    when missing, as root); False (and a log line) if it cannot be had.

    Built in GOPATH mode against Debian's sources, so nothing is downloaded;
    rebuilt whenever source_dir/main.go is newer than the binary.
    """
    source = os.path.join(source_dir, "main.go")
    if os.path.exists(binary) and os.path.getmtime(binary) >= os.path.getmtime(source):
        return True
    gorilla = os.path.join(GO_PATH, "src", "github.com", "gorilla", "websocket")
    if shutil.which("go") is None or not os.path.isdir(gorilla):
        apt_install(GO_PACKAGES)
    if shutil.which("go") is None or not os.path.isdir(gorilla):
        log(f"Go or gorilla/websocket is not installed (apt-get install {' '.join(GO_PACKAGES)});"
            f" no {what}")
        return False
    log(f"building {binary} from {os.path.relpath(source, REPO_DIR)}")
    os.makedirs(GO_DIR, exist_ok=True)
    env = dict(os.environ, GO111MODULE="off", GOPATH=GO_PATH, GOCACHE=os.path.join(GO_DIR, "gocache"),
               GOFLAGS="", GOPROXY="off", CGO_ENABLED="0")
    try:
        build = subprocess.run(["go", "build", "-o", binary, "."], cwd=source_dir, env=env,
                               capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"cannot build {binary} ({exc}); no {what}")
        return False
    if build.returncode != 0:
        log(f"cannot build {binary}; no {what}:\n{build.stderr.strip()}")
        return False
    return True


def ensure_go_server() -> bool:
    return ensure_go_binary(GO_SERVER_DIR, GO_SERVER, "compiled server")


def ensure_go_loadgen() -> bool:
    return ensure_go_binary(GO_LOADGEN_DIR, GO_LOADGEN, "Go load generator")


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
    """Direct children of a process, whichever thread forked them."""
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


def process_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def server_tree(pid: int) -> tuple[list[int], list[int]]:
    """A server's processes, split: (the server itself and its descendants but
    the room children, e.g. --workers' supervisor and workers; the room
    children, the ``cat`` processes, wherever they hang in the tree)."""
    server, rooms = [], []
    todo = [pid]
    while todo:
        p = todo.pop()
        if p != pid and process_name(p) == ROOM_CMD:
            rooms.append(p)  # a child's own children, if any, are its business
            continue
        server.append(p)
        todo += children_of(p)
    return server, rooms


def server_pss_kib(pid: int) -> int:
    """PSS of a server's processes (without the room children), in KiB."""
    return sum(pss_kib(p) or 0 for p in server_tree(pid)[0])


def pss_with_children(pid: int, deadline: float) -> tuple[int, int]:
    """PSS of a server's processes plus its room children (KiB), and how many children it has.

    Bounded in time: past the deadline, the children not read yet are counted
    at the average of those read.
    """
    server, kids = server_tree(pid)
    read, kids_total = 0, 0
    for kid in kids:
        if time.monotonic() > deadline:
            break
        kids_total += pss_kib(kid) or 0
        read += 1
    if read < len(kids):
        kids_total = kids_total * len(kids) // max(read, 1)
    return sum(pss_kib(p) or 0 for p in server) + kids_total, len(kids)


def machine_cpu_seconds() -> float:
    """CPU time all CPUs have spent busy since boot, in seconds (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK  # user..steal; guest time is inside user


@dataclass
class CpuSample:
    """CPU time (seconds) used so far by a server's processes, its room
    children, the load generator's processes and the whole machine."""
    t: float
    pid: int  # the server's own process
    server: dict[int, float]  # the server and its descendants but the room children, by pid
    rooms: dict[int, float]  # the room children alive now, by pid
    reaped: float  # room children reaped so far by the server's processes
    loadgen: dict[int, float]
    machine: float


def sample_cpu(server_pid: int, event: dict, t: float) -> CpuSample:
    """The CPU used so far, at an event of the load generator (read at time t).

    The Go load generator tells its own CPU time in the event ("cpu_s"): by
    the time bench.py reads /proc after an "end", its process may be exiting,
    its threads half gone. For node's, /proc is read (all its processes).
    """
    procs, rooms = server_tree(server_pid)
    server = {p: c for p in procs if (c := cpu_seconds(p)) is not None}
    if "cpu_s" in event:
        loadgen = {event["pids"][0]: event["cpu_s"]}
    else:
        loadgen = {p: c for p in event["pids"] if (c := cpu_seconds(p)) is not None}
    return CpuSample(
        t=t, pid=server_pid, server=server, rooms={p: c for p in rooms if (c := cpu_seconds(p)) is not None},
        reaped=sum(reaped_children_seconds(p) for p in server), loadgen=loadgen, machine=machine_cpu_seconds())


def cpu_usage(a: CpuSample, b: CpuSample) -> dict:
    """The CPU used between two samples, in % of one core (and seconds).

    The server: each of its processes, what it used since a (all of it if it
    is new); the room children: those alive at b likewise, plus those reaped
    meanwhile (all their lifetime, less what they had used by a). With several
    worker processes (the server's descendants), the busiest one's CPU too, and
    its share of theirs (50% with two evenly loaded).
    """
    wall = max(b.t - a.t, 1e-9)
    pct = lambda seconds: 100 * seconds / wall
    used = {p: c - a.server.get(p, 0.0) for p, c in b.server.items()}
    server = sum(used.values())
    gone = sum(c for p, c in a.rooms.items() if p not in b.rooms)
    rooms = max(0.0, sum(c - a.rooms.get(p, 0.0) for p, c in b.rooms.items()) + (b.reaped - a.reaped) - gone)
    loadgen = [c - a.loadgen[p] for p, c in b.loadgen.items() if p in a.loadgen]
    machine = b.machine - a.machine
    result = {
        "server_cpu_pct": pct(server),
        "server_cpu_s": server,
        "server_processes": len(used),
        "loadgen_cpu_pct": pct(max(loadgen)) if loadgen else None,
        "loadgen_cpu_pct_all": [pct(g) for g in loadgen],
        "children_cpu_pct": pct(rooms),
        "children_cpu_s": rooms,
        # Whatever else ran meanwhile (other processes, and the kernel work
        # not charged to ours): high values make the figures suspect.
        "other_cpu_pct": max(0.0, pct(machine - server - sum(loadgen) - rooms)),
    }
    workers = [c for p, c in used.items() if p != b.pid]
    if len(workers) >= 2:
        result["worker_cpu_pct"] = [pct(c) for c in workers]
        result["busiest_worker_cpu_pct"] = pct(max(workers))
        if sum(workers) > 0:
            result["busiest_worker_share_pct"] = 100 * max(workers) / sum(workers)
    return result


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

@dataclass
class ServerSetup:
    """How scalesocket.py is started: which file, with which more options."""
    scalesocket: str = SCALESOCKET
    extra_args: list[str] = field(default_factory=list)  # --server-args, before the command


class Server:
    """One server process on 127.0.0.1, started for one workload."""

    def __init__(self, kind: str, tag: str, setup: ServerSetup, profile_out: str | None = None) -> None:
        self.kind = kind
        self.log_path = f"/tmp/bench-{kind}-{tag}.log"
        self.port: int | None = None
        base = server_base(kind)
        if base == "scalesocket":
            script = [setup.scalesocket]
            if profile_out:
                script = ["-m", "cProfile", "-o", profile_out, setup.scalesocket]
            variant = WORKERS_VARIANT.fullmatch(kind)
            workers = ["--workers", variant[1]] if variant else []
            argv = [sys.executable, *script, "--addr", f"{HOST}:0", "--ping", "0", "--maxclients", "20000",
                    *workers, *setup.extra_args, ROOM_CMD]
        elif base == "websockets":
            argv = [VENV_PYTHON, WS_SERVER, "--addr", f"{HOST}:0", ROOM_CMD]
        elif base == "compiled":
            argv = [GO_SERVER, "--addr", f"{HOST}:0", ROOM_CMD]
        else:
            self.port = free_port()
            argv = ["websocketd", f"--port={self.port}", f"--address={HOST}", "--loglevel=error", ROOM_CMD]
        self.argv = argv
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

class LoadGenError(Exception):
    pass


class LoadGen:
    """A load generator (Go or node), with its JSON-line events read by a thread as they come."""

    def __init__(self, generator: str, workload: str, args: list[str], timeout: float) -> None:
        argv = [GO_LOADGEN, workload] if generator == "go" else ["node", LOADGEN, workload]
        self.proc = subprocess.Popen([*argv, *args, "--timeout", f"{timeout:.0f}"],
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

    def wait_for(self, kind: str, deadline: float) -> tuple[float, dict]:
        """The next event of this kind; LoadGenError if it ends first (or says nothing until the deadline)."""
        while True:
            t, ev = self.next_event(deadline)
            if ev is None:
                raise LoadGenError(f"no {kind!r} event from the load generator")
            if ev["ev"] == kind:
                return t, ev
            if ev["ev"] == "end":
                raise LoadGenError(ev.get("error") or f"the load generator ended before {kind!r}")

    def say(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except OSError:  # it has exited; its events (or their absence) tell why
            pass

    def finish(self) -> None:
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def option_value(args: list[str], opt: str, default: float) -> float:
    flag = f"--{opt}"
    return float(args[args.index(flag) + 1]) if flag in args else default


def run_once(server: Server, workload: Workload, args: list[str], timeout: float, rates: tuple[float, ...]) -> dict:
    """Run the load generator once; return its "end" figures plus CPU and memory.

    The load generator stops by itself after ``timeout`` seconds (reporting
    what it has); past that and a grace period, it is killed.
    """
    if workload.name == "manyrooms":
        return run_ramp(server, workload, args, timeout, rates)
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
    pss_before = server_pss_kib(server.pid)
    gen = LoadGen(workload.generator, workload.loadgen or workload.name, ["--url", server.url, *args, *extra],
                  timeout)
    deadline = time.monotonic() + timeout + 45  # its own hard stop is at timeout + 30
    begin = None
    while True:
        t, ev = gen.next_event(deadline)
        if ev is None:
            result.setdefault("error", "load generator ended without a result")
            break
        if ev["ev"] == "begin":
            begin = sample_cpu(server.pid, ev, t)
        elif ev["ev"] == "opened":  # idle: every connection is open now
            time.sleep(1.0)  # let the server settle
            result["pss_before_kib"] = pss_before
            result["pss_after_kib"] = server_pss_kib(server.pid)
            result["pss_children_after_kib"], result["children"] = pss_with_children(
                server.pid, time.monotonic() + 20)
            gen.say("go")
        elif ev["ev"] == "end":
            if begin is not None:
                result.update(cpu_usage(begin, sample_cpu(server.pid, {"pids": list(begin.loadgen), **ev}, t)))
            result.update({k: v for k, v in ev.items() if k != "ev"})
            break
    gen.finish()
    if workload.name == "idle" and "pss_after_kib" in result and result.get("opened"):
        n = result["opened"]
        result["kib_per_conn"] = (result["pss_after_kib"] - pss_before) / n
        result["kib_per_conn_children"] = (result["pss_children_after_kib"] - pss_before) / n
    return result


def run_ramp(server: Server, workload: Workload, args: list[str], timeout: float, rates: tuple[float, ...]) -> dict:
    """manyrooms: the clients connect once, then the rate goes up step by step
    (one "rate R" line to the load generator each) until the server saturates.

    Each step's figures are the load generator's plus the CPU between its
    "begin" and "stop" events; the result sums the steps up (ramp_summary).
    """
    gen = LoadGen(workload.generator, "manyrooms", ["--url", server.url, *args], timeout)
    deadline = time.monotonic() + timeout
    # How long a step takes at most, to start no step that cannot end in time.
    step_s = sum(option_value(args, opt, default) for opt, default in
                 (("settle", 1), ("duration", 3), ("drain", 3))) + 1
    duration = option_value(args, "duration", 3)
    steps: list[dict] = []
    result: dict = {}
    try:
        _, ready = gen.wait_for("ready", deadline)
        result["setup_s"] = ready.get("setup_s")
        for rate in rates:
            if time.monotonic() + step_s > deadline:
                log(f"{server.kind} manyrooms: out of time before {rate:g} msg/s per client")
                result["out_of_time"] = True
                break
            step = run_step(gen, server, rate, duration, workload.p99_limit_ms, deadline)
            log(f"{server.kind} manyrooms {rate:g} msg/s per client: {step_summary(step)}")
            if step["saturated"] and step["other_cpu_pct"] > NOISY_PCT and time.monotonic() + step_s < deadline:
                # A burst of other work on the machine must not end the ramp:
                # that step once more (the first stays in the steps, set aside).
                log(f"{server.kind} manyrooms: other processes took {step['other_cpu_pct']:.0f}% of a core"
                    " meanwhile; that step again")
                step["rerun"] = True
                steps.append(step)
                step = run_step(gen, server, rate, duration, workload.p99_limit_ms, deadline)
                log(f"{server.kind} manyrooms {rate:g} msg/s per client, again: {step_summary(step)}")
            steps.append(step)
            if step["saturated"]:
                break
        gen.say("quit")
        _, end = gen.wait_for("end", deadline + 30)
        result.update(closed_early=end.get("closed_early"), errors=end.get("errors"))
    except LoadGenError as exc:
        result["error"] = str(exc)
    finally:
        gen.finish()
    result.update(ramp_summary(steps))
    return result


def run_step(gen: LoadGen, server: Server, rate: float, duration: float, p99_limit_ms: float,
             deadline: float) -> dict:
    """One manyrooms step: its figures, the CPU between its "begin" and "stop", whether it saturated."""
    gen.say(f"rate {rate:g}")
    t, ev = gen.wait_for("begin", deadline)
    begin = sample_cpu(server.pid, ev, t)
    t, stop = gen.wait_for("stop", deadline)
    usage = cpu_usage(begin, sample_cpu(server.pid, {"pids": ev["pids"], **stop}, t))
    _, step = gen.wait_for("step", deadline)
    del step["ev"]
    if "error" in step:
        raise LoadGenError(step["error"])
    step.update(usage)
    delivered = step["deliveries_per_s"] * duration
    for who in ("server", "children"):
        step[f"{who}_us_per_delivery"] = 1e6 * usage[f"{who}_cpu_s"] / delivered if delivered else None
    step["saturated"] = saturation(step, p99_limit_ms)
    return step


def saturation(step: dict, p99_limit_ms: float) -> str | None:
    """Why the server is saturated at this step (None if it is not)."""
    why = []
    offered = step["offered_deliveries_per_s"]
    if step["deliveries_per_s"] < FOLLOW_RATIO * offered:
        why.append(f"{100 * step['deliveries_per_s'] / offered:.0f}% of the offered deliveries/s")
        if step["sent_deliveries_per_s"] < FOLLOW_RATIO * offered:  # TCP backpressure, or the load generator
            why.append(f"only {100 * step['sent_deliveries_per_s'] / offered:.0f}% of the messages could be sent"
                       f" (load generator CPU {step.get('loadgen_cpu_pct') or 0:.0f}%)")
    if step["p99_us"] is not None and step["p99_us"] > 1000 * p99_limit_ms:
        why.append(f"p99 {step['p99_us'] / 1000:.0f} ms > {p99_limit_ms:g} ms")
    if step["lost"] > LOST_RATIO * step["expected"]:
        why.append(f"{step['lost']:,} of {step['expected']:,} deliveries lost")
    if step["closed_early"]:
        why.append(f"{step['closed_early']} connections closed")
    if why and step.get("poller_cpu_pct", 0) > POLLER_BUSY_PCT:
        why.append(f"but the load generator's poller thread was {step['poller_cpu_pct']:.0f}% busy: it may be what"
                   " limits (--set manyrooms.pollers=2)")
    return "; ".join(why) or None


# The CPU figures of a step that the summary of a ramp carries (of its peak
# step as they are, of its reference step as ref_*).
CPU_FIGURES = ("server_cpu_pct", "loadgen_cpu_pct", "children_cpu_pct", "other_cpu_pct", "server_processes",
               "busiest_worker_cpu_pct", "busiest_worker_share_pct")


def ramp_summary(steps: list[dict]) -> dict:
    """A ramp's figures: the peak (the step with the most deliveries/s: at
    saturation, if it was reached), the reference step (the first rate) and
    the rate that saturated the server. Steps set aside (rerun) do not count."""
    kept = [s for s in steps if not s.get("rerun")]
    if not kept:
        return {"steps": steps}
    ref, peak = kept[0], max(kept, key=lambda s: s["deliveries_per_s"])
    saturated = next((s for s in kept if s["saturated"]), None)
    result = {
        "steps": steps, "rooms": ref["rooms"], "clients": ref["clients"],
        "deliveries_per_s": peak["deliveries_per_s"], "peak_rate": peak["rate"], "top_rate": kept[-1]["rate"],
        "saturated_at": saturated["rate"] if saturated else None,
        "saturated_why": saturated["saturated"] if saturated else None,
        "peak_server_us_per_delivery": peak["server_us_per_delivery"],
        "peak_children_us_per_delivery": peak["children_us_per_delivery"],
        "peak_lost": peak["lost"],
    }
    result.update({k: peak.get(k) for k in CPU_FIGURES})
    for k in ("rate", "deliveries_per_s", "offered_deliveries_per_s", "p50_us", "p99_us", "lost", "saturated",
              "server_us_per_delivery", "children_us_per_delivery", *CPU_FIGURES):
        result[f"ref_{k}"] = ref.get(k)
    return result


def run_workload(kind: str, workload: Workload, quick: bool, budget: list[float], setup: ServerSetup,
                 profile_out: str | None = None) -> dict:
    """Start a server, run the workload (its runs), stop the server; the median run.

    The runs share workload.timeout seconds, not counting the waits for a
    quiet machine: budget[0] is how long, in all, those may still take.
    """
    args = workload.quick_args if quick else workload.args
    rates = workload.quick_rates if quick else workload.rates
    runs = 1 if quick or profile_out else workload.runs
    server = Server(kind, workload.name, setup, profile_out)
    results = []
    end = time.monotonic() + workload.timeout  # the runs share this; waiting for quiet aside
    try:
        for i in range(runs):
            waited = time.monotonic()
            busy = wait_for_quiet(budget)
            end += time.monotonic() - waited  # waiting for a quiet machine does not count
            left = end - time.monotonic()
            if results and left < 5:
                log(f"{kind} {workload.name}: out of time after {i} runs")
                break
            r = run_once(server, workload, args, max(left, 5), rates)
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
    return {"runs": results, "median": median, "server_log": server.log_path, "server_argv": server.argv,
            "generator": workload.generator}


def cpu_summary(r: dict) -> str:
    """The CPU figures of a run (or step), for the log."""
    procs = r.get("server_processes") or 1
    server = f"server {r.get('server_cpu_pct', 0):.0f}%"
    if procs > 1:
        server += f" ({procs} processes"
        if r.get("busiest_worker_share_pct") is not None:
            server += (f", busiest worker {r['busiest_worker_cpu_pct']:.0f}%:"
                       f" {r['busiest_worker_share_pct']:.0f}% of the workers'")
        server += ")"
    return (f" | cpu: {server} loadgen {r.get('loadgen_cpu_pct') or 0:.0f}%"
            f" child {r.get('children_cpu_pct', 0):.0f}% other {r.get('other_cpu_pct', 0):.0f}%")


def step_summary(step: dict) -> str:
    """One line on a manyrooms step, for the log."""
    num = lambda v, spec: "?" if v is None else format(v, spec)
    text = (f"{step['deliveries_per_s']:,.0f} of {step['offered_deliveries_per_s']:,.0f} deliveries/s,"
            f" p50 {num(step['p50_us'], ',')} µs p99 {num(step['p99_us'], ',')} µs, lost {step['lost']},"
            f" server {num(step['server_us_per_delivery'], '.2f')} µs/delivery" + cpu_summary(step)
            + f" (its poller {num(step.get('poller_cpu_pct'), '.0f')}%)")
    return text + (f" SATURATED: {step['saturated']}" if step["saturated"] else "")


def summary(workload: Workload, r: dict) -> str:
    """One line on a run, for the log."""
    if "error" in r and workload.name != "manyrooms":
        return f"ERROR {r['error']}"
    if r.get("timeout"):
        return "TIMEOUT (partial figures) " + summary(workload, {k: v for k, v in r.items() if k != "timeout"})
    cpu = cpu_summary(r)
    f = lambda key, spec="": "?" if r.get(key) is None else format(r[key], spec)  # partial figures lack some
    if workload.name == "rtt":
        return f"{f('msg_per_s', ',.0f')} msg/s p50 {f('p50_us', '.0f')} µs p99 {f('p99_us', '.0f')} µs" + cpu
    if workload.name.startswith("fanout"):
        poller = f" (its poller {r['poller_cpu_pct']:.0f}%)" if r.get("poller_cpu_pct") is not None else ""
        return (f"{f('deliveries_per_s', ',.0f')} deliveries/s lost {f('lost')} out-of-order {f('out_of_order')}"
                + cpu + poller)
    if workload.name == "big":
        return f"{f('mb_per_s', '.1f')} MB/s bad {f('bad')}" + cpu
    if workload.name == "idle":
        return (f"{f('kib_per_conn', '.1f')} KiB/conn, opened {f('opened')}/{f('requested')} "
                f"held {f('held')} reached {f('reached')}")
    if workload.name == "manyrooms":
        error = f" ERROR {r['error']}" if "error" in r else ""
        if not r.get("steps"):
            return error.strip() or "no step"
        reached = (f"saturated at {r['saturated_at']:g} msg/s per client ({r['saturated_why']})"
                   if r["saturated_at"] is not None else f"not saturated at {r['top_rate']:g} msg/s per client")
        return f"{r['deliveries_per_s']:,.0f} deliveries/s at most, {reached}" + cpu + error
    return f"{f('per_s', ',.0f')}/s failed {f('failed')}" + cpu


# --------------------------------------------------------------------------
# The tables.
# --------------------------------------------------------------------------

def fmt_num(value: float | None) -> str:
    if value is None:
        return "?"
    if isinstance(value, int):
        return f"{value:,}"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


# (workload, row label, figure of the median run, CPU beside it: None, or the
# prefix of the CPU figures to show, "" for the run's own). row_label fills
# in the labels' {fields}.
ROWS = [
    ("rtt", "round trip 64 B: msg/s", "msg_per_s", ""),
    ("rtt", "round trip 64 B: p50 µs (lower is better)", "p50_us", None),
    ("rtt", "round trip 64 B: p99 µs (lower is better)", "p99_us", None),
    ("fanout", "fan-out 100x2000: deliveries/s", "deliveries_per_s", ""),
    ("fanout", "fan-out 100x2000: lost msgs", "lost", None),
    ("fanout20k", "fan-out 100x{messages} sustained: deliveries/s", "deliveries_per_s", ""),
    ("fanout20k", "fan-out 100x{messages} sustained: lost msgs", "lost", None),
    ("big", "1 MiB echo: MB/s", "mb_per_s", ""),
    ("handshake", "handshakes: conn/s", "per_s", ""),
    ("idle", "idle {requested}: KiB/conn, server (lower is better)", "kib_per_conn", None),
    ("idle", "idle {requested}: KiB/conn with children", "kib_per_conn_children", None),
    ("idle", "idle {requested}: connections held", "held", None),
    ("rooms", "new rooms: rooms/s", "per_s", ""),
    ("manyrooms", "many rooms {rooms}x{clients}: deliveries/s at saturation (peak)", "deliveries_per_s", ""),
    ("manyrooms", "many rooms: saturated at msg/s per client", "saturated_at", None),
    ("manyrooms", "many rooms: server CPU µs/delivery at the peak", "peak_server_us_per_delivery", None),
    ("manyrooms", "many rooms: busiest worker at the peak, share of the workers' CPU", "busiest_worker_share_pct",
     None),
    ("manyrooms", "many rooms @{ref} msg/s per client: deliveries/s", "ref_deliveries_per_s", "ref_"),
    ("manyrooms", "many rooms @{ref}: p50 µs (lower is better)", "ref_p50_us", None),
    ("manyrooms", "many rooms @{ref}: p99 µs (lower is better)", "ref_p99_us", None),
    ("manyrooms", "many rooms @{ref}: server CPU µs/delivery", "ref_server_us_per_delivery", None),
    ("manyrooms", "many rooms @{ref}: cat CPU µs/delivery", "ref_children_us_per_delivery", None),
    ("manyrooms", "many rooms: lost msgs @{ref} / at the peak", "lost_ref_peak", None),
]
ONLY_IF_ANY = {"busiest_worker_share_pct"}  # rows left out when no server has the figure
NO_RATIO = {"held", "lost", "lost_ref_peak", "saturated_at"}


def row_label(label: str, m: dict) -> str:
    """A row's label with its {fields} filled in from a median run."""
    fanout_messages = m["expected"] // m["clients"] if m.get("expected") and m.get("clients") else None
    values = {
        "messages": f"{fanout_messages:,}" if fanout_messages else "N",
        "requested": f"{m['requested']:,}" if m.get("requested") else "",
        "rooms": m.get("rooms", "?"), "clients": m.get("clients", "?"),
        "ref": f"{m['ref_rate']:g}" if m.get("ref_rate") is not None else "?",
    }
    return label.format(**values).replace(" :", ":")


def cell(res: dict | None, figure: str, cpu: str | None) -> str:
    if res is None:
        return "–"
    m = res["median"]
    present = {"lost_ref_peak": "ref_lost", "saturated_at": "steps"}.get(figure, figure)
    if m.get(present) in (None, []):
        return "error" if "error" in m else "–" if figure in ONLY_IF_ANY else "?"
    if figure == "held":
        reached = m.get("reached")
        text = f"{m.get('held', 0)}/{m.get('requested', '?')}"
        return text + (f" (bcast {reached})" if reached is not None else "")
    if figure == "lost":
        return f"{m.get('lost')} (order {m.get('out_of_order')})"
    if figure == "lost_ref_peak":
        return f"{m['ref_lost']} / {m.get('peak_lost')}"
    if figure == "saturated_at":
        return f"{m['saturated_at']:g}" if m["saturated_at"] is not None else f"> {m['top_rate']:g} (not saturated)"
    text = fmt_num(m[figure]) + ("%" if figure.endswith("_pct") else "")
    if figure == "busiest_worker_share_pct":
        text += f" ({m['busiest_worker_cpu_pct']:.0f}% of a core)"
    if cpu is not None and m.get(f"{cpu}server_cpu_pct") is not None:
        gen = m.get(f"{cpu}loadgen_cpu_pct")
        text += f" ({m[f'{cpu}server_cpu_pct']:.0f}%" + (f" g{gen:.0f}%" if gen is not None else "") + ")"
    return text


def ratio(a: dict | None, b: dict | None, figure: str) -> str:
    if a is None or b is None or figure in NO_RATIO:
        return "–"
    x, y = a["median"].get(figure), b["median"].get(figure)
    if not isinstance(x, (int, float)) or not isinstance(y, (int, float)) or y == 0:
        return "–"
    return f"{x / y:.2f}x"


def short_name(kind: str) -> str:
    """A server's name in the ratio columns: ss, w2, compiled..."""
    variant = WORKERS_VARIANT.fullmatch(kind)
    return f"w{variant[1]}" if variant else "ss" if kind == "scalesocket" else kind


def print_rows(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r).rstrip())


def print_steps(per: dict, servers: list[str]) -> None:
    """manyrooms, step by step: where each server stopped following the rate."""
    pct = lambda v: "–" if v is None else f"{v:.0f}%"
    num = lambda v, spec=",": "?" if v is None else format(v, spec)
    rows = []
    for s in servers:
        for st in per.get(s, {}).get("median", {}).get("steps", []):
            rows.append([server_title(s), f"{st['rate']:g}", num(st["offered_deliveries_per_s"], ",.0f"),
                         num(st["deliveries_per_s"], ",.0f"), num(st["p50_us"]), num(st["p99_us"]), num(st["lost"]),
                         pct(st["server_cpu_pct"]), str(st.get("server_processes", 1)),
                         pct(st.get("busiest_worker_cpu_pct")), pct(st.get("busiest_worker_share_pct")),
                         pct(st["loadgen_cpu_pct"]), pct(st.get("poller_cpu_pct")),
                         pct(st["children_cpu_pct"]), pct(st["other_cpu_pct"]),
                         num(st["server_us_per_delivery"], ".2f"),
                         "set aside (busy machine), run again" if st.get("rerun")
                         else "saturated" if st["saturated"] else ""])
    if not rows:
        return
    print("many rooms, step by step (deliveries/s offered and received; latency from the send to the arrival at"
          " the other clients; CPU in % of one core; with several workers, the busiest one's CPU and its share of"
          " the workers'; the load generator's process and its busiest poller thread)")
    print_rows(["server", "msg/s per client", "offered/s", "received/s", "p50 µs", "p99 µs", "lost", "server",
                "procs", "worker", "share", "loadgen", "poller", "cat", "other", "server µs/delivery", ""], rows)
    print()


def print_table(results: dict, quick: bool, servers: list[str]) -> None:
    ref, others = servers[0], servers[1:]
    header = ["workload", *(server_title(s) for s in servers),
              *(f"{short_name(ref)}/{short_name(s)}" for s in others)]
    rows = []
    for name, label, figure, cpu in ROWS:
        per = results.get(name)
        if not per:
            continue
        if figure in ONLY_IF_ANY and all(r["median"].get(figure) is None for r in per.values()):
            continue
        rows.append([row_label(label, next(iter(per.values()))["median"])]
                    + [cell(per.get(s), figure, cpu) for s in servers]
                    + [ratio(per.get(ref), per.get(s), figure) for s in others])
    print()
    print(f"Results ({'quick' if quick else 'full'} run; medians; (S% gG%) = CPU of the server (all its processes"
          " but the cat children) and of the load generator during the timed phase, 100% = one core busy)")
    print("Load generator: " + "; ".join(
        f"{'Go' if g == 'go' else 'node'} for {', '.join(n for n in results if WORKLOADS[n].generator == g)}"
        for g in ("go", "node") if any(WORKLOADS[n].generator == g for n in results)))
    print_rows(header, rows)
    print()
    if "manyrooms" in results:
        print_steps(results["manyrooms"], servers)
    # Where the CPU went: is the server saturated, or the load generator, or
    # did something else on the machine take a share?
    print("CPU during the timed phase, % of one core: server / load generator's busiest process /"
          " the server's children (cat) / everything else on the machine (manyrooms: its peak step)")
    noisy = []
    for name in WORKLOADS:
        if name not in results or name == "idle":
            continue
        cells = []
        for s in servers:
            m = results[name].get(s, {}).get("median", {})
            if m.get("server_cpu_pct") is None:
                cells.append(f"{short_name(s)} –")
                continue
            cells.append(f"{short_name(s)} {m['server_cpu_pct']:.0f}/{m.get('loadgen_cpu_pct') or 0:.0f}"
                         f"/{m.get('children_cpu_pct', 0):.0f}/{m.get('other_cpu_pct', 0):.0f}")
            if m.get("other_cpu_pct", 0) > NOISY_PCT:
                noisy.append(f"{name}/{s}")
        print(f"  {name:<10} " + "   ".join(c.ljust(24) for c in cells).rstrip())
    if noisy:
        print(f"WARNING: other processes used over 30% of a core during {', '.join(noisy)}: those figures are skewed")
    # scalesocket.py must exit cleanly (status 0) on SIGINT, after every workload.
    for kind in servers:
        statuses = {name: per[kind]["median"].get("exit_status") for name, per in results.items() if kind in per}
        bad = {k: v for k, v in statuses.items() if v != 0}
        if server_base(kind) == "scalesocket" and statuses:
            print(f"{server_title(kind)} exit status after SIGINT: " + ("0 after every workload" if not bad else
                  ", ".join(f"{k}: {v}" for k, v in bad.items()) + " (expected 0)"))
        elif kind == "compiled" and bad:
            print("compiled (Go) exit status after SIGINT: " + ", ".join(f"{k}: {v}" for k, v in bad.items())
                  + " (expected 0)")
    print()


# --------------------------------------------------------------------------
# Profiling.
# --------------------------------------------------------------------------

def profile(workload: Workload, quick: bool, max_wait: float, setup: ServerSetup) -> dict:
    out = f"/tmp/bench-prof-{workload.name}.out"
    if os.path.exists(out):
        os.unlink(out)
    log(f"profiling scalesocket.py on {workload.name} (cProfile slows it: figures are not comparable)")
    res = run_workload("scalesocket", workload, quick, [max_wait], setup, profile_out=out)
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

def choose_generators(names: list[str], prefer: str) -> list[str]:
    """Set each workload's load generator: the Go one where it has the workload
    (and can be built) unless node is preferred; node's otherwise. Returns the
    workloads that can run (manyrooms cannot without Go)."""
    wants_go = prefer == "go" and any("go" in WORKLOADS[n].generators for n in names)
    go = wants_go and ensure_go_loadgen()
    runnable = []
    for name in names:
        wl = WORKLOADS[name]
        usable = [g for g in wl.generators if g == "node" or go]
        if prefer == "node" and "node" in usable:
            usable = ["node"]
        if not usable:
            log(f"skipping {name}: only the Go load generator has it, and "
                + ("--loadgen node was asked" if prefer == "node" else "it cannot be had"))
            continue
        wl.generator = usable[0]
        for i in range(0, len(wl.generator_args.get(wl.generator, [])), 2):
            opt, value = wl.generator_args[wl.generator][i:i + 2]
            wl.args = with_option(wl.args, opt[2:], value)
            wl.quick_args = with_option(wl.quick_args, opt[2:], value)
        runnable.append(name)
    return runnable


def apply_set(parser: argparse.ArgumentParser, item: str) -> None:
    """--set [WORKLOAD.]OPTION=VALUE: a load generator option, for one workload or every one that takes it."""
    key, sep, value = item.partition("=")
    target, _, opt = key.rpartition(".")
    if not sep or not opt:
        parser.error(f"--set wants [WORKLOAD.]OPTION=VALUE, not {item!r}")
    if target and target not in WORKLOADS:
        parser.error(f"--set {item}: unknown workload {target!r}")
    generator = lambda wl: wl.generator or wl.generators[0]  # chosen, or (not to run) its first
    applied = []
    for wl in WORKLOADS.values():
        if (target and wl.name != target) or opt not in generator_options(generator(wl)):
            continue
        wl.args, wl.quick_args = with_option(wl.args, opt, value), with_option(wl.quick_args, opt, value)
        applied.append(wl.name)
    if not applied:
        parser.error(f"--set {item}: " + (f"{target}'s load generator ({generator(WORKLOADS[target])}) has no --{opt}"
                                          if target else "no load generator has that option"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark scalesocket.py against websockets, a compiled (Go) server and websocketd"
                    " (details: the module docstring).",
        epilog="workloads: " + "; ".join(f"{w.name}: {w.title}" for w in WORKLOADS.values()))
    parser.add_argument("--quick", action="store_true", help="short run: smaller counts, one run each")
    parser.add_argument("--only", metavar="WORKLOAD[,...]", help=f"run only these: {', '.join(WORKLOADS)}")
    parser.add_argument("--servers", metavar="NAME[,...]", default=",".join(SERVERS),
                        help=f"servers to run, the first is the one the ratios compare (default: {','.join(SERVERS)};"
                             " also scalesocket-wN: scalesocket.py --workers N)")
    parser.add_argument("--server-args", metavar="ARGS", default="",
                        help='more options for every scalesocket.py server, e.g. --server-args "--workers 2"')
    parser.add_argument("--scalesocket", metavar="FILE", default=SCALESOCKET,
                        help="the scalesocket.py to run (default: the repository's)")
    parser.add_argument("--loadgen", choices=("go", "node"), default="go",
                        help="load generator (default: go; node for every workload but manyrooms, which"
                             " only Go has; node is also what runs when Go cannot be had)")
    parser.add_argument("--rates", metavar="R[,...]",
                        help="manyrooms: the messages/s per client, step by step; the first is the reference rate"
                             f" (default: {','.join(f'{r:g}' for r in WORKLOADS['manyrooms'].rates)};"
                             f" --quick: {','.join(f'{r:g}' for r in WORKLOADS['manyrooms'].quick_rates)})")
    parser.add_argument("--p99-limit", metavar="MS", type=float, default=WORKLOADS["manyrooms"].p99_limit_ms,
                        help="manyrooms: a step with a p99 latency over this is saturated (default: %(default)g)")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures of every run to FILE")
    parser.add_argument("--set", metavar="[WORKLOAD.]OPTION=VALUE", action="append", default=[],
                        help="override a load generator option, e.g. --set concurrency=32 or"
                             " --set manyrooms.clients=10 (repeatable)")
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
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for s in servers:
        if s not in SERVERS and not WORKERS_VARIANT.fullmatch(s):
            parser.error(f"unknown server {s!r}; choose from {', '.join(SERVERS)} or scalesocket-wN")
    if not os.path.exists(args.scalesocket):
        sys.exit(f"bench: {args.scalesocket} not found")
    setup = ServerSetup(os.path.abspath(args.scalesocket), shlex.split(args.server_args))
    if args.rates:
        try:
            rates = tuple(float(r) for r in args.rates.split(","))
        except ValueError:
            rates = ()
        if not rates or min(rates) <= 0:
            parser.error(f"--rates wants positive numbers, not {args.rates!r}")
        WORKLOADS["manyrooms"].rates = WORKLOADS["manyrooms"].quick_rates = rates
    WORKLOADS["manyrooms"].p99_limit_ms = args.p99_limit

    nofile = raise_nofile()
    if nofile < NOFILE:
        log(f"fd limit is {nofile} (the hard limit; raising it needs CAP_SYS_RESOURCE)")
    names = choose_generators(names, args.loadgen)
    for item in args.set:
        apply_set(parser, item)
    if any(WORKLOADS[n].generator == "node" for n in names):
        ensure_node_ws()
    if args.profile:
        if not names:
            return 1
        res = profile(WORKLOADS[args.profile], args.quick, args.max_wait, setup)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"profile": args.profile, "result": res}, f, indent=1)
        return 0
    bases = {server_base(s) for s in servers}
    if "websockets" in bases and not ensure_venv():
        servers.remove("websockets")
    if "websocketd" in bases and not ensure_websocketd():
        servers.remove("websocketd")
    if "compiled" in bases and not ensure_go_server():
        servers.remove("compiled")
    if not servers:
        sys.exit("bench: no server to run")

    started = time.monotonic()
    budget = [args.max_wait]  # seconds the whole run may spend waiting for a quiet machine
    results: dict = {}
    for name in names:
        wl = WORKLOADS[name]
        results[name] = {}
        for kind in servers:
            if server_base(kind) not in wl.servers:
                continue
            if time.monotonic() - started > RUN_LIMIT:
                log(f"skipping {kind} {name}: the run has taken over {RUN_LIMIT} s")
                continue
            try:
                results[name][kind] = run_workload(kind, wl, args.quick, budget, setup)
            except RuntimeError as exc:
                log(f"{kind} {name}: {exc}")
                results[name][kind] = {"runs": [], "median": {"error": str(exc)}}
    elapsed = time.monotonic() - started

    print_table(results, args.quick, servers)
    print(f"took {elapsed:.0f} s")
    if args.json:
        version = lambda argv: (subprocess.run(argv, capture_output=True, text=True).stdout.strip()
                                if shutil.which(argv[0]) else None)
        meta = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "quick": args.quick,
            "python": platform.python_version(),
            "node": version(["node", "--version"]),
            "go": version(["go", "version"]),
            "cpus": os.cpu_count(),
            "git": subprocess.run(["git", "-C", REPO_DIR, "rev-parse", "HEAD"], capture_output=True,
                                  text=True).stdout.strip(),
            "scalesocket": setup.scalesocket,
            "server_args": setup.extra_args,
            "generators": {n: WORKLOADS[n].generator for n in names},
            "elapsed_s": elapsed,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        log(f"raw figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
