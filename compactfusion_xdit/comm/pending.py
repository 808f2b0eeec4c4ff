"""`Pending`: the handle an asynchronous compressed operation returns."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence


class Pending:
    """In-flight communication; ``wait()`` completes it and returns its result (a tensor, or None
    for sends). Keeps the works (torch ``Work`` objects or other `Pending`s) and buffers alive until
    then (gloo loses messages whose work handle is dropped). ``wait()`` may be called more than
    once; later calls return the same result. `waited_from`: when the first ``wait()`` began
    (`hidden_since`), so a finish can tell the time an exchange ran alongside its caller's work."""

    def __init__(self, works: Sequence[Any], finish: Callable[[], Any] | None = None, keep: Any = None) -> None:
        self._works = [w for w in works if w is not None]
        self._finish = finish
        self._keep = keep
        self._done = False
        self._result = None
        self.waited_from: float | None = None

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works)

    def wait(self) -> Any:
        if not self._done:
            self.waited_from = time.perf_counter()
            for w in self._works:
                w.wait()
            self._result = self._finish() if self._finish is not None else None
            self._done = True
            self._works, self._finish, self._keep = [], None, None
        return self._result


def completed(result: Any) -> Pending:
    """A handle whose operation already finished."""
    return Pending([], lambda: result)


def hidden_since(start: float, pending: Pending) -> float:
    """Seconds between posting an exchange at `start` and the first wait on it: the caller's work
    the transfer could hide behind (0 for an exchange waited on at once)."""
    return max(pending.waited_from - start, 0.0) if pending.waited_from is not None else 0.0

