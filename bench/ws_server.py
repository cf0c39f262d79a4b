"""The websockets-library stand-in for scalesocket.py, used by bench.py.

The same job as ``scalesocket.py CMD`` in text mode, written the way one would
with the `websockets` PyPI package (its asyncio API) and nothing else:

* a client connects to ws://HOST:PORT/ROOM; the first client of a room starts
  one CMD process for it; later clients share it;
* each client message is written to the child's stdin followed by "\\n";
* each line the child prints is broadcast to every client of the room
  (``websockets.broadcast``: encoded once, no per-client await);
* when the last client leaves, the child is killed and reaped.

Compression and keepalive pings are off and the message size limit is
16 MiB, like ``scalesocket.py --ping 0``, so both do the same work per message.

    /tmp/bench-venv/bin/python bench/ws_server.py --addr 127.0.0.1:0 cat

logs ``listening on 127.0.0.1:PORT`` on stderr and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import websockets
from websockets.asyncio.server import ServerConnection, broadcast, serve

MAX_SIZE = 16 * 2**20
LINE_LIMIT = 32 * 2**20  # longest child line the output pump reads whole


class Room:
    """One room: its clients and its child process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.clients: set[ServerConnection] = set()
        self.proc: asyncio.subprocess.Process | None = None
        self.started: asyncio.Task | None = None  # starts the child; later clients await it
        self.pump: asyncio.Task | None = None

    async def start(self, cmd: list[str]) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=LINE_LIMIT)
        self.pump = asyncio.get_running_loop().create_task(self._pump_output())

    async def _pump_output(self) -> None:
        """Broadcast every line the child prints to the room's clients."""
        stdout = self.proc.stdout
        while True:
            line = await stdout.readline()
            if not line:
                break
            broadcast(self.clients, line.rstrip(b"\n"), text=True)

    async def stop(self) -> None:
        """Kill the child and reap it."""
        if self.started is not None:
            await asyncio.gather(self.started, return_exceptions=True)
        if self.pump is not None:
            self.pump.cancel()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.stdin.close()
            self.proc.kill()
            await self.proc.wait()


class Hub:
    """All rooms; serves each connection."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.rooms: dict[str, Room] = {}

    async def handler(self, ws: ServerConnection) -> None:
        name = ws.request.path.split("?", 1)[0].lstrip("/")
        room = self.rooms.get(name)
        if room is None:
            # Made and registered before any await, so concurrent first
            # clients of a room share one child.
            room = self.rooms[name] = Room(name)
            room.started = asyncio.get_running_loop().create_task(room.start(self.cmd))
        room.clients.add(ws)
        try:
            await room.started
            stdin = room.proc.stdin
            async for message in ws:
                data = message.encode() if isinstance(message, str) else message
                stdin.write(data + b"\n")
                await stdin.drain()  # backpressure when the child is behind
        except (ConnectionError, websockets.ConnectionClosed):
            pass
        finally:
            room.clients.discard(ws)
            if not room.clients and self.rooms.get(name) is room:
                del self.rooms[name]
                await room.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default="127.0.0.1:9000", help="HOST:PORT (port 0 picks a free one)")
    parser.add_argument("cmd", nargs="+", help="command run for each room")
    args = parser.parse_args()
    host, _, port = args.addr.rpartition(":")
    hub = Hub(args.cmd)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(hub.handler, host, int(port), compression=None, ping_interval=None,
                     max_size=MAX_SIZE, close_timeout=2) as server:
        sockname = next(iter(server.sockets)).getsockname()
        print(f"listening on {sockname[0]}:{sockname[1]}", file=sys.stderr, flush=True)
        await stop.wait()
        server.close()
        await server.wait_closed()
    for room in list(hub.rooms.values()):
        await room.stop()


if __name__ == "__main__":
    asyncio.run(main())
