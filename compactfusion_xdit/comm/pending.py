"""`Pending`: the handle an asynchronous compressed operation returns."""

from __future__ import annotations

from typing import Any, Callable, Sequence


class Pending:
    """In-flight communication; ``wait()`` completes it and returns its result (a tensor, or None
    for sends). Keeps the works (torch ``Work`` objects or other `Pending`s) and buffers alive until
    then (gloo loses messages whose work handle is dropped). ``wait()`` may be called more than
    once; later calls return the same result."""

    def __init__(self, works: Sequence[Any], finish: Callable[[], Any] | None = None, keep: Any = None) -> None:
        self._works = [w for w in works if w is not None]
        self._finish = finish
        self._keep = keep
        self._done = False
        self._result = None

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works)

    def wait(self) -> Any:
        if not self._done:
            for w in self._works:
                w.wait()
            self._result = self._finish() if self._finish is not None else None
            self._done = True
            self._works, self._finish, self._keep = [], None, None
        return self._result


def completed(result: Any) -> Pending:
    """A handle whose operation already finished."""
    return Pending([], lambda: result)
