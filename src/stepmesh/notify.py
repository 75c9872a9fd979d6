"""Stream-ordered waits (StepMesh's ``SimpleNotify``): a CUDA stream waits, the CPU does not.

A flag in mapped pinned host memory is awaited on the caller's current stream
with ``cuStreamWaitValue32``; a helper thread completes the push_pull (or takes
the next server batch) and then writes the flag, releasing the stream. Work
queued behind the wait (a CUDA graph replay, say) runs as soon as the data is
there, with no CPU-side synchronisation in the caller.

Thread safety: while a helper thread waits, the caller may go on issuing
push_pulls (StepMesh's pattern); it must not wait for the same handle itself.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .errors import ArgumentError, ConfigError, StepMeshError

__all__ = ["SimpleNotify"]

_CU_STREAM_WAIT_VALUE_EQ = 0x1


def _current_device() -> int:
    import torch

    return torch.cuda.current_device()


def _enter(device: int) -> None:
    """Make the caller's device current in a helper thread: UCX's CUDA copies use the thread's context."""
    import torch

    torch.cuda.set_device(device)


class SimpleNotify:
    """StepMesh's stream-ordered notification, same methods and meaning.

    Worker: ``stream_wait_event(handle)`` makes the current stream wait for that
    push_pull; ``wait_event_done()`` joins the helper (and raises its error).
    Server: ``block_now_stream_and_get_batch()`` makes the current stream wait
    for the next batch, ``get_future_batch_data()`` returns it;
    ``block_now_stream()`` makes the stream wait for the next notification.
    """

    def __init__(self) -> None:
        self._driver: Any = None
        self._flag: Any = None
        self._host: Any = None
        self._dptr = 0
        self._count = 1
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future[list[tuple[int, list[Any], list[int]]]] | None = None
        self._initialised = False

    def init(self) -> None:
        """Allocate the flag in mapped pinned memory.

        Where torch sees no CUDA device this does nothing, so that code which
        creates a SimpleNotify up front (StepMesh's vLLM connector) runs on the
        CPU; the first call that would wait on a stream raises then.

        Raises:
            ConfigError: CUDA is there but its driver is not.
        """
        import torch

        from .kernels import device_pointer, driver

        self._initialised = True
        if not torch.cuda.is_available():
            return
        self._driver = driver()
        self._flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        self._host = self._flag.numpy()
        self._dptr = device_pointer(self._flag.data_ptr())

    def _block_stream(self) -> None:
        if not self._initialised:
            raise StepMeshError("SimpleNotify.init() was not called")
        if self._driver is None:
            raise ConfigError("SimpleNotify waits on a CUDA stream; torch sees no CUDA device here (use wait()/get_batch())")
        import torch

        stream = torch.cuda.current_stream().cuda_stream
        if stream == 0:
            # A wait on the legacy default stream also holds back every blocking
            # stream of the process, UCX's own copy streams included: the data
            # that would release it could never arrive.
            raise ArgumentError(
                "SimpleNotify needs a non-default current stream: wrap the call in "
                "`with torch.cuda.stream(torch.cuda.Stream()):` (CUDA-graph capture streams qualify)"
            )
        self._driver.check(
            self._driver.wait_value(ctypes.c_void_p(stream), self._dptr, self._count, _CU_STREAM_WAIT_VALUE_EQ),
            "cuStreamWaitValue32",
        )

    def _notify(self) -> None:
        self._host[0] = self._count
        self._count += 1

    # ---------------------------------------------------------------- worker
    def stream_wait_event(self, handle: int) -> None:
        """The current stream waits until push_pull ``handle`` is complete; returns at once.

        Raises:
            ArgumentError: a previous stream_wait_event is still pending (call wait_event_done()).
        """
        from . import _worker

        worker = _worker("stream_wait_event")
        if self._thread is not None and self._thread.is_alive():
            raise ArgumentError("stream_wait_event: the previous one is still pending; call wait_event_done() first")
        self._block_stream()
        device = _current_device()

        def run() -> None:
            try:
                _enter(device)
                worker.wait(handle)
            except BaseException as e:  # re-raised by wait_event_done()
                self._error = e
            finally:
                self._notify()  # never leave the stream blocked

        self._thread = threading.Thread(target=run, name="stepmesh-notify", daemon=True)
        self._thread.start()

    def wait_event_done(self) -> None:
        """Join the helper of the last stream_wait_event; raise what it raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    # ---------------------------------------------------------------- server
    def block_now_stream(self) -> None:
        """The current stream waits for the next notification."""
        self._block_stream()

    def block_now_stream_and_get_batch(self) -> None:
        """The current stream waits for the next batch, taken by a helper thread; returns at once."""
        from . import _server

        server = _server("block_now_stream_and_get_batch")
        self._block_stream()
        device = _current_device()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="stepmesh-notify")

        def run() -> list[tuple[int, list[Any], list[int]]]:
            try:
                _enter(device)
                return server.get_batch()
            finally:
                self._notify()

        self._future = self._pool.submit(run)

    def get_future_batch_data(self) -> list[tuple[int, list[Any], list[int]]]:
        """The batch taken by block_now_stream_and_get_batch() (waits for it)."""
        if self._future is None:
            raise StepMeshError("get_future_batch_data() before block_now_stream_and_get_batch()")
        future, self._future = self._future, None
        return future.result()
