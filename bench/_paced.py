"""Open-loop load at a fixed rate, for timing how a token comes back.

A client that keeps asking does not wait for the token: it sends its next
request on schedule whatever the last answer was. :class:`Paced` does that
(request ``i`` starts at ``start + i / rate``) and records, per call, when it
started and finished and whether it succeeded, so that the time from a
token's return to the first signature after it can be read off
(:meth:`Paced.recovered_after`). bench/tokens.py and tests/test_tokens.py
both use it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType


@dataclass(frozen=True)
class Call:
    """One request: monotonic start and end (s), and whether it succeeded."""

    start: float
    end: float
    ok: bool
    error: str = ""


class Paced:
    """``call()`` at ``rate`` per second from ``threads`` threads, while in
    the ``with`` block. ``call`` returns normally on success and raises on
    failure (its text is kept); it must be safe to call from several
    threads. A rate of 0 sends nothing.

    The schedule is kept as long as a call takes less than
    ``threads / rate`` seconds; slower calls make the load lag behind it
    (:attr:`lag` tells the largest lag seen, in seconds)."""

    def __init__(self, call: Callable[[], object], rate: float, threads: int = 4) -> None:
        self._call = call
        self._rate = rate
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads if rate > 0 else 0)]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._start = 0.0
        self.calls: list[Call] = []
        self.lag = 0.0

    def __enter__(self) -> Paced:
        self._start = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                due = self._start + self._next / self._rate
                self._next += 1
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            start = time.monotonic()
            self.lag = max(self.lag, start - due)
            try:
                self._call()
                ok, error = True, ""
            except Exception as e:  # noqa: BLE001 - any failure of a call is recorded
                details = getattr(e, "details", None)  # grpc.RpcError's text
                ok, error = False, str(details() if callable(details) else e)
            with self._lock:
                self.calls.append(Call(start, time.monotonic(), ok, error))

    def snapshot(self) -> list[Call]:
        """The calls finished so far, in the order they finished."""
        with self._lock:
            return list(self.calls)

    def recovered_after(self, t: float) -> float | None:
        """Seconds from ``t`` (monotonic) to the end of the first successful
        call that started at or after ``t``; None if none has yet."""
        ends = [c.end for c in self.snapshot() if c.ok and c.start >= t]
        return min(ends) - t if ends else None

    def failures_after(self, t: float) -> list[Call]:
        """Failed calls that started at or after ``t``."""
        return [c for c in self.snapshot() if not c.ok and c.start >= t]
