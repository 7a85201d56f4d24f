"""A TCP proxy on 127.0.0.1 that delays each direction: a database a network hop away, simulated.

    .venv/bin/python bench/delay_proxy.py --target 127.0.0.1:5432 --delay-ms 2.5 [--listen 0]

The kernel here has no netem qdisc, so the delay is added in user space: every chunk read from one side
is written to the other ``delay`` seconds after it arrived (order kept, no bandwidth limit), so a round
trip costs twice the delay on top of the loopback's. It prints ``listening on 127.0.0.1:PORT`` and runs
until killed.

It also counts **turns** per connection: a turn begins when the client sends after the server has
spoken (or for the first time) — one round trip the client waited for. With a delay of a millisecond
or more, everything a client pipelines goes out before any answer can come back, so the count is the
number of network round trips, whatever the client library does inside (tests/security/test_pg_scaling.py
uses it as the oracle of the round-trip figure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass
class Link:
    """One proxied connection's counters."""

    turns: int = 0
    server_spoke: bool = True  # the client's first bytes open a turn
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class DelayProxy:
    """Listen on 127.0.0.1 and forward to ``target_host:target_port``, ``delay`` seconds each way."""

    target_host: str
    target_port: int
    delay: float
    listen_port: int = 0
    links: list[Link] = field(default_factory=list)
    _server: asyncio.base_events.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def turns(self) -> int:
        """Round trips clients waited for, over every connection so far."""
        return sum(link.turns for link in self.links)

    async def start(self) -> int:
        """Start listening; returns the port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        return self.listen_port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_writer.close()
            return
        link = Link()
        self.links.append(link)
        for coroutine in (self._pump(client_reader, server_writer, link, up=True),
                          self._pump(server_reader, client_writer, link, up=False)):
            task = asyncio.create_task(coroutine)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link, up: bool) -> None:
        """Read chunks as they come; a second task writes each one ``delay`` after its arrival."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._deliver(queue, writer, link, up))
        try:
            while data := await reader.read(CHUNK):
                if up:
                    link.bytes_up += len(data)
                    if link.server_spoke:
                        link.turns += 1
                        link.server_spoke = False
                queue.put_nowait((time.monotonic() + self.delay, data))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender

    @staticmethod
    async def _deliver(queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter, link: Link,
                       up: bool) -> None:
        try:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                pause = due - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                writer.write(data)
                if not up:
                    link.bytes_down += len(data)
                    link.server_spoke = True
                await writer.drain()
        finally:
            writer.close()


async def _serve(target: str, delay_ms: float, listen: int) -> None:
    host, _, port = target.rpartition(":")
    proxy = DelayProxy(host or "127.0.0.1", int(port), delay_ms / 1000, listen)
    bound = await proxy.start()
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to (127.0.0.1 only in this workplace)")
    parser.add_argument("--delay-ms", type=float, required=True, help="delay added in EACH direction")
    parser.add_argument("--listen", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    args = parser.parse_args(argv)
    try:
        import uvloop  # the proxy shares the cores with what it measures: the faster loop if there is one

        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.target, args.delay_ms, args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
