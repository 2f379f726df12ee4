"""Read a streaming call's requests ahead of its handler (SignStream, threads engine)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


class ReadAhead(Generic[T]):
    """Iterate ``requests`` on a thread of its own, and hand them over in
    rounds: a round is every request that arrived while the previous round
    was being answered (at least one), in arrival order, cut at ``limit``
    requests or once it holds ``max_bytes`` (by ``size``, in bytes).

    The reader waits while ``limit`` requests or ``max_bytes`` are queued
    (a request larger than ``max_bytes`` is still taken, alone), so a client
    that sends faster than it is answered is held back by gRPC's flow
    control, and one stream holds at most about two rounds in memory: the
    one being answered and the one queued.

    Use it as a context manager; leaving it stops the reader, which drops
    what it has read (the call is over). If the stream itself raises (gRPC's
    request iterator raises grpc.RpcError when the client cancels), iterating
    raises that error after the rounds before it.

    Why a thread: grpcio's sync server offers no way to ask whether another
    message has arrived without blocking on it, and its handler blocks on
    every send until it completes."""

    def __init__(self, requests: Iterator[T], limit: int, max_bytes: int,
                 size: Callable[[T], int]) -> None:
        if limit < 1 or max_bytes < 1:
            raise ValueError(f"limit and max_bytes must be at least 1, got {limit}, {max_bytes}")
        self._requests = requests
        self._limit = limit
        self._max_bytes = max_bytes
        self._size = size
        self._queue: deque[tuple[T, int]] = deque()
        self._bytes = 0  # the sizes of what _queue holds
        self._end: BaseException | None | bool = False  # False: not yet; None: ended; or raised
        self._stopped = False
        self._cond = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._read, name="signerd-readahead", daemon=True)

    def _full(self) -> bool:
        return bool(self._queue) and (len(self._queue) >= self._limit
                                      or self._bytes >= self._max_bytes)

    def _read(self) -> None:
        end: BaseException | None = None
        try:
            for request in self._requests:
                n = self._size(request)
                with self._cond:
                    while self._full() and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return
                    self._queue.append((request, n))
                    self._bytes += n
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the handler's thread
            end = e
        with self._cond:
            self._end = end
            self._cond.notify_all()

    def __enter__(self) -> Iterator[list[T]]:
        self._thread.start()
        return self._rounds()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        # A reader waiting for room returns at once; one blocked in the
        # stream itself returns when the call ends.
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._cond.notify_all()

    def _rounds(self) -> Iterator[list[T]]:
        while True:
            with self._cond:
                while not self._queue and self._end is False:
                    self._cond.wait()
                batch: list[T] = []
                taken = 0
                while self._queue and len(batch) < self._limit and (
                        not batch or taken + self._queue[0][1] <= self._max_bytes):
                    request, n = self._queue.popleft()
                    batch.append(request)
                    taken += n
                self._bytes -= taken
                end = self._end
                self._cond.notify_all()
            if batch:
                yield batch
            elif end is None:
                return
            elif isinstance(end, BaseException):
                raise end
