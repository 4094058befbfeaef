"""An ordered, bounded parallel map over a process pool (in-process for one worker)."""
from __future__ import annotations

import multiprocessing
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


class Workers:
    """``with Workers(n, initializer, initargs) as workers: workers.map(f, tasks)``.

    Unlike ``Pool.imap``, ``map`` keeps at most ``max_pending`` tasks in flight, so a huge
    input is never queued whole in memory; results come in task order.
    """

    def __init__(self, n: int, initializer: Callable[..., None], initargs: tuple = ()):
        self.n = n
        self._initializer, self._initargs = initializer, initargs
        self._pool = None

    def __enter__(self) -> "Workers":
        if self.n <= 1:
            self._initializer(*self._initargs)
        else:
            # spawn: workers inherit neither the parent's threads (tqdm's monitor) nor its imports.
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.n, self._initializer, self._initargs)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            if exc_info[0] is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None

    def map(self, function: Callable[[Task], Result], tasks: Iterable[Task],
            max_pending: int | None = None) -> Iterator[Result]:
        if self._pool is None:
            yield from map(function, tasks)
            return
        max_pending = max_pending or 2 * self.n
        pending: deque = deque()
        for task in tasks:
            pending.append(self._pool.apply_async(function, (task,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
