"""Read a streaming call's requests ahead of its handler (SignStream, threads engine)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Generic, TypeVar

T = TypeVar("T")


class _End:
    """The reader's last word: the stream ended (``error`` None) or raised."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class ReadAhead(Generic[T]):
    """Iterate ``requests`` on a thread of its own, and hand them over in
    rounds: a round is every request that arrived while the previous round
    was being answered (at least one, at most ``limit``), in arrival order.

    The queue between the two holds at most ``limit`` requests; past that
    the reader waits, so a client that sends faster than it is answered is
    held back by gRPC's flow control and memory stays bounded.

    Use it as a context manager; leaving it stops the reader, which drops
    what it has read (the call is over). If the stream itself raises (gRPC's
    request iterator raises grpc.RpcError when the client cancels), iterating
    raises that error after the rounds before it.

    Why a thread: grpcio's sync server offers no way to ask whether another
    message has arrived without blocking on it, and its handler blocks on
    every send until it completes."""

    def __init__(self, requests: Iterator[T], limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._requests = requests
        self._limit = limit
        self._queue: queue.Queue[T | _End] = queue.Queue(maxsize=limit)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._read, name="signerd-readahead", daemon=True)

    def _read(self) -> None:
        end = _End(None)
        try:
            for request in self._requests:
                self._queue.put(request)
                if self._stopped.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the handler's thread
            end = _End(e)
        self._queue.put(end)

    def __enter__(self) -> Iterator[list[T]]:
        self._thread.start()
        return self._rounds()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Wake a reader blocked on a full queue; it then sees the flag and
        # returns. One blocked in the stream itself returns when the call ends.
        self._stopped.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _rounds(self) -> Iterator[list[T]]:
        while True:
            item = self._queue.get()
            batch: list[T] = []
            while not isinstance(item, _End):
                batch.append(item)
                if len(batch) == self._limit:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                yield batch
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
