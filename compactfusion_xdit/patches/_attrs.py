"""Reversible attribute replacement: the one mechanism every patch module uses.

    patcher = AttributePatcher()
    patcher.replace(some_module, "some_function", wrapper)
    ...
    patcher.replace_item(some_dict, key, value)
    patcher.restore()        # every attribute back to exactly what it was (or deleted if absent)
"""

from __future__ import annotations

from typing import Any

_ABSENT = object()


class _Item:
    def __init__(self, key: Any) -> None:
        self.key = key


class AttributePatcher:
    """Records each replaced attribute and restores them all, newest first."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def replace(self, owner: Any, name: str, value: Any) -> Any:
        """Set ``owner.name = value``; return the previous value (None if there was none)."""
        previous = owner.__dict__.get(name, _ABSENT) if hasattr(owner, "__dict__") else getattr(owner, name, _ABSENT)
        self._saved.append((owner, name, previous))
        setattr(owner, name, value)
        return None if previous is _ABSENT else previous

    def replace_item(self, mapping: dict, key: Any, value: Any) -> Any:
        """Set ``mapping[key] = value``; return the previous value (None if there was none)."""
        previous = mapping.get(key, _ABSENT)
        self._saved.append((mapping, _Item(key), previous))
        mapping[key] = value
        return None if previous is _ABSENT else previous

    def restore(self) -> None:
        while self._saved:
            owner, name, previous = self._saved.pop()
            if isinstance(name, _Item):
                if previous is _ABSENT:
                    owner.pop(name.key, None)
                else:
                    owner[name.key] = previous
            elif previous is _ABSENT:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, previous)

    def __len__(self) -> int:
        return len(self._saved)
