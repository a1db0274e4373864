"""A user-space fault-injecting TCP proxy: a slow, flaky field link between a device and the broker.

Why user space: this kernel has no `netem` (latency, jitter, loss and cuts cannot be set with `tc`),
and a proxy lets a test aim a fault at a byte position ("cut the link 1,000 bytes into the result
upload"), which no queueing discipline can. `tc tbf` in a network namespace still works for a pure
bandwidth limit (docs/field.md); this proxy limits bandwidth too, so one tool covers every profile.

What it does to the bytes (each direction on its own: `up` = client -> target, `down` = back):
  * delay + jitter: every chunk arrives `delay_s` +- `jitter_s` (uniform) after it left the
    sender, never before an earlier chunk (TCP keeps order, so the link does too);
  * bandwidth: chunks are serialized at `rate_bps` over one link shared by all connections; the
    queue is short, so a slow link pushes back on the sender's socket as a real one does;
  * stall(s): live connections stop moving for s seconds, then resume with nothing lost;
  * cut(): every live connection is reset (the broker sees the socket close, the device too);
  * outage(s): cut, then every new connection is reset at once for s seconds;
  * half_open(): live connections go silent (bytes dropped both ways) and are never closed by the
    proxy: only the endpoints' keepalives can find out (a dead NAT mapping, a radio gone quiet);
  * arm(Trigger): once `pattern` has passed in a direction and then `after_bytes` more have been
    delivered, do one of the above (e.g. cut a device's MQTT PUBLISH to `.../up/result` midway);
  * flap(period, down): an outage of `down` seconds every `period` seconds.

It runs an asyncio loop on its own thread; every public method is thread-safe and returns once the
loop has applied it. Stats (`stats()`) count what was delivered, dropped, cut and refused.
Loopback-only by default; stdlib only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Direction = Literal["up", "down"]
Action = Literal["cut", "outage", "half_open", "stall"]
CHUNK = 4096  # bytes read per step: 33 ms of a 1 Mbit/s link, so pacing stays fine-grained
QUEUE_CHUNKS = 8  # chunks in flight per direction and connection: 32 KiB, ~0.25 s at 1 Mbit/s


@dataclass(frozen=True)
class LinkShape:
    """The steady state of the link, per direction: one-way delay, jitter and bandwidth."""

    delay_s: float = 0.0  # one-way: the round trip is twice this
    jitter_s: float = 0.0  # each chunk's delay is uniform in [delay - jitter, delay + jitter]
    rate_bps: float | None = None  # bits per second; None: as fast as loopback


@dataclass
class Trigger:
    """A one-shot fault aimed at a byte position: after `pattern` passed in `direction` and then
    `after_bytes` more were delivered, apply `action` (for `outage`/`stall`: for `seconds`)."""

    pattern: bytes
    action: Action
    direction: Direction = "up"
    after_bytes: int = 0
    seconds: float | None = None
    fired_at: float | None = None  # time.monotonic() when it fired; -1 while counting down after_bytes


@dataclass
class LinkStats:
    bytes_up: int = 0  # delivered to the target
    bytes_down: int = 0  # delivered to the client
    dropped_bytes: int = 0  # swallowed by half-open connections
    connections: int = 0  # accepted and forwarded
    refused: int = 0  # reset during an outage
    cuts: int = 0  # connections reset by cut()/outage()
    half_opened: int = 0  # connections turned silent
    stalls: int = 0
    outages: int = 0
    triggers_fired: int = 0
    events: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, what)


class _Side:
    """One direction of one connection: its reader's pattern-matching state."""

    def __init__(self, direction: Direction, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.direction = direction
        self.reader, self.writer = reader, writer
        self.tail = b""  # last len(pattern)-1 bytes, so a pattern split across reads is still found
        self.countdown: tuple[Trigger, int] | None = None  # trigger matched, bytes left before it fires
        self.last_due = 0.0


class _Conn:
    def __init__(self, client_w: asyncio.StreamWriter, up_w: asyncio.StreamWriter):
        self.writers = (client_w, up_w)
        self.tasks: list[asyncio.Task[None]] = []
        self.silent = False  # half-open: drop everything, never close
        self.eofs = 0  # directions the sender closed; at 2 the connection is over

    def abort(self) -> None:
        for w in self.writers:
            w.transport.abort()
        for t in self.tasks:
            if t is not asyncio.current_task():
                t.cancel()


class LinkFaultProxy:
    """`LinkFaultProxy(host, port, shape).start()`; connect to `.port` instead of the target."""

    def __init__(self, target_host: str, target_port: int, shape: LinkShape | None = None, *,
                 listen_host: str = "127.0.0.1", listen_port: int = 0, seed: int = 0):  # fmt: skip
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.shape = shape or LinkShape()
        self.port = 0
        self._rng = random.Random(seed)
        self._stats = LinkStats()
        self._conns: set[_Conn] = set()
        self._silent: set[_Conn] = set()  # half-open: not cut by faults, aborted only by close()
        self._refusing = False
        self._stalled_until = 0.0
        self._unstall = asyncio.Event()
        self._next_free: dict[str, float] = {"up": 0.0, "down": 0.0}  # when the link is free to send again
        self._triggers: list[Trigger] = []
        self._timers: list[asyncio.TimerHandle] = []
        self._flapper: asyncio.Task[None] | None = None
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="link-fault-proxy", daemon=True)

    # ------------------------------------------------------------------ lifecycle (any thread)
    def start(self) -> LinkFaultProxy:
        self._thread.start()
        self._server = self._call_async(asyncio.start_server(self._accept, *self.listen, reuse_address=True))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"mqtt://{self.listen[0]}:{self.port}"

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        def stop() -> None:
            if self._server is not None:
                self._server.close()
            self._cut_all("close")
            for c in self._silent:
                c.abort()
            if self._flapper is not None:
                self._flapper.cancel()
            for t in self._timers:
                t.cancel()
            for task in asyncio.all_tasks(self._loop):  # silent connections' pumps, the flapper
                if task is not asyncio.current_task():
                    task.cancel()

        self._call(stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> LinkFaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------- faults (any thread)
    def set_shape(self, shape: LinkShape) -> None:
        self._call(lambda: setattr(self, "shape", shape))

    def cut(self) -> int:
        """Reset every live connection now; returns how many."""
        return self._call(self._cut_all, "cut")

    def outage(self, seconds: float | None) -> None:
        """Cut, and reset every new connection for `seconds` (None: until restore())."""
        self._call(self._outage, seconds)

    def restore(self) -> None:
        """End an outage and a stall early (half-open connections stay dead: they are gone)."""
        self._call(self._restore)

    def half_open(self) -> int:
        """Every live connection goes silent without closing; returns how many."""
        return self._call(self._half_open_all)

    def stall(self, seconds: float) -> None:
        """Live and new connections stop moving bytes for `seconds`; then everything is delivered."""
        self._call(self._stall, seconds)

    def arm(self, trigger: Trigger) -> Trigger:
        """Add a one-shot trigger (see Trigger); its `fired_at` is set when it fires."""
        self._call(self._triggers.append, trigger)
        return trigger

    def flap(self, period_s: float, down_s: float) -> None:
        """From now on, an outage of `down_s` every `period_s` seconds (until stop_flapping())."""

        def go() -> None:
            if self._flapper is not None:
                self._flapper.cancel()
            self._flapper = self._loop.create_task(self._flap(period_s, down_s))

        self._call(go)

    def stop_flapping(self) -> None:
        self._call(lambda: self._flapper.cancel() if self._flapper is not None else None)

    def stats(self) -> LinkStats:
        """A copy of the counters (events list included)."""
        return self._call(lambda: replace(self._stats, events=list(self._stats.events)))

    # ------------------------------------------------------------------------ loop thread
    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the loop thread and return its result (directly when already there)."""
        if threading.current_thread() is self._thread:
            return fn(*args)

        async def run() -> Any:
            return fn(*args)

        return self._call_async(run())

    def _call_async(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _event(self, what: str) -> None:
        self._stats.events.append((time.monotonic(), what))

    def _cut_all(self, why: str) -> int:
        conns, self._conns = list(self._conns), set()
        for c in conns:
            c.abort()
        self._stats.cuts += len(conns)
        self._event(f"{why} {len(conns)}")
        return len(conns)

    def _outage(self, seconds: float | None) -> None:
        self._cut_all("outage")
        self._refusing = True
        self._stats.outages += 1
        if seconds is not None:
            self._timers.append(self._loop.call_later(seconds, self._end_outage))

    def _end_outage(self) -> None:
        self._refusing = False
        self._event("restored")

    def _restore(self) -> None:
        self._end_outage()
        self._stalled_until = 0.0
        self._unstall.set()

    def _half_open_all(self) -> int:
        conns, self._conns = list(self._conns), set()  # no longer ours to cut: they are dead air
        for c in conns:
            c.silent = True
        self._silent.update(conns)
        self._stats.half_opened += len(conns)
        self._event(f"half_open {len(conns)}")
        return len(conns)

    def _stall(self, seconds: float) -> None:
        self._stalled_until = max(self._stalled_until, time.monotonic() + seconds)
        self._unstall.clear()
        self._stats.stalls += 1
        self._event(f"stall {seconds:g}s")
        self._timers.append(self._loop.call_later(seconds, self._unstall.set))

    async def _flap(self, period_s: float, down_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            self._outage(down_s)

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        if self._refusing:
            self._stats.refused += 1
            cw.transport.abort()
            return
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, asyncio.TimeoutError):
            cw.transport.abort()
            return
        if self._refusing:  # the outage began while we connected
            self._stats.refused += 1
            for w in (cw, uw):
                w.transport.abort()
            return
        conn = _Conn(cw, uw)
        self._conns.add(conn)
        self._stats.connections += 1
        self._event("connect")
        for side in (_Side("up", cr, uw), _Side("down", ur, cw)):
            q: asyncio.Queue[tuple[float, bytes | Trigger | None]] = asyncio.Queue(QUEUE_CHUNKS)
            conn.tasks.append(self._loop.create_task(self._read(side, q)))
            conn.tasks.append(self._loop.create_task(self._write(conn, side, q)))

    def _schedule(self, side: _Side, n: int) -> float:
        """When a chunk of n bytes read now arrives: after the link is free and has sent it, plus delay."""
        now = time.monotonic()
        sh = self.shape
        start = max(now, self._next_free[side.direction])
        sent = start + (n * 8 / sh.rate_bps if sh.rate_bps else 0.0)
        self._next_free[side.direction] = sent
        delay = sh.delay_s + (self._rng.uniform(-sh.jitter_s, sh.jitter_s) if sh.jitter_s else 0.0)
        side.last_due = max(side.last_due, sent + max(0.0, delay))
        return side.last_due

    def _split(self, side: _Side, data: bytes) -> list[bytes | Trigger]:
        """data cut at the byte where an armed trigger fires, the trigger in between."""
        out: list[bytes | Trigger] = []
        while data:
            if side.countdown is not None:
                trig, left = side.countdown
                if len(data) < left:
                    side.countdown = (trig, left - len(data))
                    out.append(data)
                    return out
                side.countdown = None
                out += [data[:left], trig]
                data = data[left:]
                continue
            trig_or_none = next(
                (t for t in self._triggers if t.direction == side.direction and t.fired_at is None), None
            )
            if trig_or_none is None:
                out.append(data)
                return out
            trig = trig_or_none
            buf = side.tail + data
            i = buf.find(trig.pattern)
            if i < 0:
                side.tail = buf[-(len(trig.pattern) - 1) :] if len(trig.pattern) > 1 else b""
                out.append(data)
                return out
            end = i + len(trig.pattern) - len(side.tail)  # the byte after the pattern, in data
            side.tail = b""
            trig.fired_at = -1.0  # claimed: no other connection matches it meanwhile
            side.countdown = (trig, trig.after_bytes)
            out.append(data[:end])
            data = data[end:]
        if side.countdown is not None and side.countdown[1] == 0:  # pattern ended exactly at the chunk's end
            out.append(side.countdown[0])
            side.countdown = None
        return out

    async def _read(self, side: _Side, q: asyncio.Queue[tuple[float, bytes | Trigger | None]]) -> None:
        try:
            while data := await side.reader.read(CHUNK):
                for piece in self._split(side, data):
                    if isinstance(piece, Trigger):
                        await q.put((side.last_due, piece))
                    elif piece:
                        await q.put((self._schedule(side, len(piece)), piece))
        except (OSError, asyncio.IncompleteReadError):
            pass
        await q.put((side.last_due, None))

    async def _write(
        self, conn: _Conn, side: _Side, q: asyncio.Queue[tuple[float, bytes | Trigger | None]]
    ) -> None:
        out = conn.writers[1] if side.direction == "up" else conn.writers[0]
        try:
            while True:
                due, item = await q.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                while self._stalled_until > time.monotonic():
                    await self._unstall.wait()
                if isinstance(item, Trigger):
                    self._fire(conn, item)
                    continue
                if conn.silent:
                    if item is not None:
                        self._stats.dropped_bytes += len(item)
                    continue  # never closes: the far end must find out by itself
                if item is None:
                    with contextlib.suppress(OSError):
                        out.write_eof()  # half-close, as the sender did
                    conn.eofs += 1
                    if conn.eofs == 2:
                        conn.abort()
                        self._conns.discard(conn)
                    return
                out.write(item)
                await out.drain()
                if side.direction == "up":
                    self._stats.bytes_up += len(item)
                else:
                    self._stats.bytes_down += len(item)
        except (OSError, ConnectionError):
            conn.abort()
            self._conns.discard(conn)

    def _fire(self, conn: _Conn, trig: Trigger) -> None:
        trig.fired_at = time.monotonic()
        self._stats.triggers_fired += 1
        self._event(f"trigger {trig.action} after {trig.pattern!r}+{trig.after_bytes}")
        if trig.action == "cut":
            self._cut_all("cut")
        elif trig.action == "outage":
            self._outage(trig.seconds)
        elif trig.action == "stall":
            self._stall(trig.seconds or 0.0)
        elif trig.action == "half_open":
            self._conns.discard(conn)
            self._silent.add(conn)
            conn.silent = True
            self._stats.half_opened += 1
