"""The one helper every streamed handler uses: run work in a thread, hand its items over a queue.

Gradio streams a handler's output by iterating a generator, possibly resuming it on another
thread, possibly never again (the browser went away). Work that holds MODEL_LOCK (a generation
with masks applied, a structured prune) therefore runs in a worker thread of its own, which
always finishes what it holds (restores the weights, releases the lock); the handler's generator
only reads what the worker emits.

    for item in Streamed(lambda emit, stop: ..., name="explorer-generate"):
        ...

- `emit(item)` hands an item to the reader, in order;
- `stop` is a threading.Event set when the reader stops reading (the generator is closed or
  garbage-collected): the worker should check it and end early;
- the worker's return value is `.result` after the iteration; its exception is raised in the
  reader's thread;
- `coalesce(item)`: items for which it is true are skipped when a newer such item is already
  waiting (a search's intermediate best plans: only the newest is worth drawing);
- gradio's context (its progress target) is copied into the worker.
"""
from __future__ import annotations

import contextvars
import queue
import threading
from collections import deque
from typing import Any, Callable, Iterator

_ITEM, _DONE, _ERROR = "item", "done", "error"


class Streamed:
    """Iterate the items `work(emit, stop)` emits from a worker thread (see the module docstring)."""

    def __init__(self, work: Callable[[Callable[[Any], None], threading.Event], Any], *,
                 name: str = "explorer-stream", coalesce: Callable[[Any], bool] | None = None,
                 stop: threading.Event | None = None):
        self.work, self.name, self.coalesce = work, name, coalesce
        self.stop = stop or threading.Event()
        self.result: Any = None
        self._started = False

    def __iter__(self) -> Iterator[Any]:
        if self._started:
            raise RuntimeError("a Streamed runs once")
        self._started = True
        events: queue.Queue = queue.Queue()

        def emit(item: Any) -> None:
            events.put((_ITEM, item))

        def run() -> None:
            try:
                events.put((_DONE, self.work(emit, self.stop)))
            except BaseException as exc:  # handed to the reader's thread
                events.put((_ERROR, exc))

        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(run,), daemon=True, name=self.name).start()
        pending: deque = deque()
        try:
            while True:
                kind, value = pending.popleft() if pending else events.get()
                if kind == _ITEM and self.coalesce is not None and self.coalesce(value):
                    while True:  # skip to the newest coalescable item already waiting
                        try:
                            nxt = events.get_nowait()
                        except queue.Empty:
                            break
                        if nxt[0] == _ITEM and self.coalesce(nxt[1]):
                            value = nxt[1]
                        else:
                            pending.append(nxt)
                            break
                if kind == _ITEM:
                    yield value
                elif kind == _ERROR:
                    raise value
                else:
                    self.result = value
                    return
        finally:
            self.stop.set()  # the reader is gone (or done): the worker ends at its next check
