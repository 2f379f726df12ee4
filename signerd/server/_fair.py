"""Fair admission: work slots shared between identities by queueing, not refusal.

A serving process does ``slots`` requests at once (server.threads). A
request takes a slot before its work (token, signature) and gives it back
after; one that finds none it may take waits in a queue, in order, until
one frees, until its deadline passes, or until its caller goes away. Who
gets a freed slot, and who may take a free one:

* **Reserve.** The last ``reserve`` slots go only to an identity that has
  no request running, so an identity arriving while others keep every other
  slot busy is served at once. An identity alone on the daemon therefore
  uses ``slots - reserve`` of them (and no more than ``per_identity``, when
  that is set lower).
* **Fewest first.** A freed slot goes to the waiting identity with the
  fewest requests running; among equals, to the one served longest ago
  (round robin); each identity's own requests in arrival order. Identities
  that keep calling converge on equal shares, whatever their number of
  callers.
* **Bounded queue.** At most ``max_waiting`` requests wait, all identities
  together. A request arriving at a full queue takes the place of the
  newest waiter of the identity with the most waiting, if that identity
  has at least two more waiting than its own (longest queue drop, so the
  identity that floods is the one refused); otherwise it is refused.
  Refusals are RESOURCE_EXHAUSTED; a deadline passed while waiting is
  DEADLINE_EXCEEDED, a caller gone CANCELLED.

The latency this gives another identity while one floods: its first
request (up to ``reserve`` at once) waits for nothing; each further one
waits at most until the next of the running requests ends, since a freed
slot goes to it first while it has fewer running than the flooder.

Streams (SignStream) are counted here too, so that they stay bounded: at
most ``max_streams`` open at once, all identities together. An open stream
holds no slot: each of its requests takes one as a unary request does.
Beyond that bound a stream is refused at once (a stream lives long;
queueing one would hold its caller for as long).

Written here rather than taken from a library: the asyncio and threading
primitives (Semaphore, Condition) have one FIFO queue and no notion of who
waits; this needs a choice among identities at every release, and one queue
serving threads (threads engine) and coroutines (aio engine) alike.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable

from signerd.errors import Cancelled, DeadlineExceeded, ResourceExhausted, SignerdError, quoted

# Longest single wait between two looks at a waiting request's deadline
# (threading refuses timeouts past TIMEOUT_MAX; gRPC reports "no deadline"
# as a huge remaining time).
_MAX_WAIT = 3600.0
_CLOCKS = 0.05  # seconds between gRPC's deadline and ours, computed from time_remaining()


class _Waiter:
    """One request in the queue; ``wake`` is called (under the lock) once
    it is granted a slot or pushed out of the queue."""

    __slots__ = ("who", "seq", "granted", "error", "wake")

    def __init__(self, who: Hashable, seq: int, wake: Callable[[], None]) -> None:
        self.who = who
        self.seq = seq
        self.granted = False
        self.error: SignerdError | None = None
        self.wake = wake


class Admission:
    """Work slots, their queue, and the stream count of one serving process
    (see the module docstring for the rules). Thread-safe; the async
    methods run on an event loop and may be woken from any thread.

    ``slots``: requests at once (>= 1); ``reserve``: slots kept for an
    identity with nothing running (< slots); ``per_identity``: most slots
    one identity holds (>= 1); ``max_waiting``: queue bound, all identities;
    ``max_streams``: open streams, all identities (None: no bound)."""

    def __init__(self, slots: int, reserve: int, per_identity: int, max_waiting: int,
                 max_streams: int | None = None) -> None:
        if not 0 <= reserve < slots or per_identity < 1 or max_waiting < 0:
            raise ValueError(f"bad admission bounds: slots={slots} reserve={reserve} "
                             f"per_identity={per_identity} max_waiting={max_waiting}")
        self.slots = slots
        self.reserve = reserve
        self.per_identity = min(per_identity, slots - reserve)
        self.max_waiting = max_waiting
        self.max_streams = max_streams
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running: Counter[Hashable] = Counter()
        self._total = 0
        self._waiting: dict[Hashable, deque[_Waiter]] = {}
        self._queued = 0
        self._open_streams = 0
        self._seq = itertools.count()
        # When each active identity (running or waiting) last got a slot:
        # the round robin among identities with as many running.
        self._served: dict[Hashable, int] = {}

    # -- the rules, under the lock ------------------------------------------

    def _may_run(self, who: Hashable) -> bool:
        mine = self._running[who]
        if self._total >= self.slots or mine >= self.per_identity:
            return False
        return mine == 0 or self._total < self.slots - self.reserve

    def _take(self, who: Hashable) -> None:
        self._running[who] += 1
        self._total += 1
        self._served[who] = next(self._seq)

    def _dispatch(self) -> None:
        """Grant free slots to waiters, fewest running first."""
        while self._queued:
            best: tuple[tuple[int, int], Hashable] | None = None
            for who in self._waiting:
                if self._may_run(who):
                    rank = (self._running[who], self._served.get(who, -1))
                    if best is None or rank < best[0]:
                        best = (rank, who)
            if best is None:
                return
            waiter = self._pop(best[1], newest=False)
            self._take(waiter.who)
            waiter.granted = True
            waiter.wake()

    def _pop(self, who: Hashable, newest: bool) -> _Waiter:
        queue = self._waiting[who]
        waiter = queue.pop() if newest else queue.popleft()
        if not queue:
            del self._waiting[who]
        self._queued -= 1
        return waiter

    def _enqueue(self, who: Hashable, wake: Callable[[], None]) -> _Waiter:
        if self._queued >= self.max_waiting:
            mine = len(self._waiting.get(who, ()))
            victim = max(self._waiting, key=lambda w: len(self._waiting[w]), default=None)
            if victim is None or victim == who or len(self._waiting[victim]) < mine + 2:
                raise self._full(who, mine)
            dropped = self._pop(victim, newest=True)
            dropped.error = self._full(victim, len(self._waiting.get(victim, ())) + 1)
            dropped.wake()
        waiter = _Waiter(who, next(self._seq), wake)
        self._waiting.setdefault(who, deque()).append(waiter)
        self._queued += 1
        return waiter

    def _full(self, who: Hashable, waiting: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"the server's queue is full: {self.max_waiting} requests wait for one of its "
            f"{self.slots} threads (server.threads), {waiting} of them from identity "
            f"{quoted(str(who))}; retry once some of yours have finished")

    def _give_up(self, waiter: _Waiter) -> None:
        """``waiter`` stops waiting: out of the queue, or its slot back if it
        was granted one meanwhile."""
        if waiter.granted:
            self._release_locked(waiter.who)
            return
        if waiter.error is None:  # still queued
            queue = self._waiting[waiter.who]
            queue.remove(waiter)
            if not queue:
                del self._waiting[waiter.who]
            self._queued -= 1
            self._forget_if_inactive(waiter.who)
            self._notify_if_idle()

    def _release_locked(self, who: Hashable) -> None:
        self._running[who] -= 1
        if not self._running[who]:
            del self._running[who]
        self._total -= 1
        self._dispatch()
        self._forget_if_inactive(who)
        self._notify_if_idle()

    def _forget_if_inactive(self, who: Hashable) -> None:
        if who not in self._running and who not in self._waiting:
            self._served.pop(who, None)

    def _notify_if_idle(self) -> None:
        if not (self._total or self._queued or self._open_streams):
            self._idle.notify_all()

    # -- requests -----------------------------------------------------------

    def acquire(self, who: Hashable, timeout: float | None = None,
                watch: Callable[[Callable[[], None]], object] | None = None) -> None:
        """Take a slot for ``who``, waiting for it up to ``timeout`` seconds
        (None: no deadline). ``watch(fn)`` registers ``fn`` to be called when
        the caller goes away (grpc's ``context.add_callback``). Raises
        ResourceExhausted (queue full, or pushed out of it), DeadlineExceeded
        or Cancelled; on return the caller must :meth:`release`."""
        event = threading.Event()
        with self._lock:
            if not self._waiting.get(who) and self._may_run(who):
                self._take(who)
                return
            waiter = self._enqueue(who, event.set)
        gone = [False]
        if watch is not None:
            def away() -> None:  # from gRPC's thread, or this one if the call already ended
                with self._lock:
                    gone[0] = True
                    event.set()
            if watch(away) is False:  # gRPC: the call has already ended
                away()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _MAX_WAIT if deadline is None else deadline - time.monotonic()
            event.wait(max(0.0, min(left, _MAX_WAIT)))
            with self._lock:
                if waiter.granted and not gone[0]:
                    return
                if waiter.error is not None:
                    raise waiter.error
                # gRPC ends a call at its deadline too (``watch``), by its own
                # clock: a call gone within _CLOCKS of the deadline expired.
                expired = deadline is not None and time.monotonic() >= deadline - (
                    _CLOCKS if gone[0] else 0.0)
                if expired or gone[0]:
                    self._give_up(waiter)
                    if expired:
                        raise self._expired(who, timeout)
                    raise Cancelled("the caller went away while its request waited")
                event.clear()

    async def acquire_async(self, who: Hashable, timeout: float | None = None) -> None:
        """:meth:`acquire` for a coroutine on an event loop: waits without
        blocking the loop. A cancelled task (its call ended) leaves the
        queue, or gives back a slot it was granted meanwhile."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(_settle, done)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        with self._lock:
            if not self._waiting.get(who) and self._may_run(who):
                self._take(who)
                return
            waiter = self._enqueue(who, wake)
        try:
            await asyncio.wait_for(done, None if timeout is None else max(0.0, timeout))
        except TimeoutError:
            with self._lock:
                if waiter.error is not None:
                    raise waiter.error from None
                self._give_up(waiter)  # back to the queue's next, if granted meanwhile
            raise self._expired(who, timeout) from None
        except BaseException:  # the call's task was cancelled: its caller is gone
            with self._lock:
                self._give_up(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error

    def _expired(self, who: Hashable, timeout: float | None) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the deadline passed after {timeout or 0:.3f} s waiting for a thread "
            f"(identity {quoted(str(who))}); every one was busy")

    def release(self, who: Hashable) -> None:
        """Give back a slot :meth:`acquire` took for ``who``."""
        with self._lock:
            self._release_locked(who)

    # -- streams ------------------------------------------------------------

    def open_stream(self) -> None:
        """Count one more open stream, or raise ResourceExhausted at once
        when ``max_streams`` are open. (An identity no rule grants is refused
        before it gets here: :meth:`Gate.stream_slot`.)"""
        with self._lock:
            if self.max_streams is not None and self._open_streams >= self.max_streams:
                raise ResourceExhausted(
                    f"the server has {self._open_streams} streams open, its limit (half of "
                    "server.threads, so that streams never hold every handler thread); "
                    "retry later, or sign with Sign or SignBatch")
            self._open_streams += 1

    def close_stream(self) -> None:
        """Count a stream closed."""
        with self._lock:
            self._open_streams -= 1
            self._notify_if_idle()

    # -- state --------------------------------------------------------------

    def running(self, who: Hashable) -> int:
        """Slots ``who`` holds now."""
        with self._lock:
            return self._running[who]

    def waiting(self) -> int:
        """Requests in the queue now, all identities."""
        with self._lock:
            return self._queued

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no request runs or waits and
        no stream is open; whether that is so."""
        with self._idle:
            return self._idle.wait_for(
                lambda: not (self._total or self._queued or self._open_streams), timeout)


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
