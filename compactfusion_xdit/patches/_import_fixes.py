"""Run a fix-up right before or after one named module executes, the first time it is imported.

A meta-path finder that delegates the lookup to the rest of ``sys.meta_path`` and wraps the found
loader: ``before(module)`` runs on the fresh (empty) module namespace, ``after(module)`` once the
module body has run and before any importer can read names from it. Nothing else is touched: other
modules import exactly as they would without it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Callable

Hook = Callable[[ModuleType], None]


class _WrappedLoader(importlib.abc.Loader):
    def __init__(self, loader, before: Hook | None, after: Hook | None) -> None:
        self._loader = loader
        self._before = before
        self._after = after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if self._before is not None:
            self._before(module)
        try:
            self._loader.exec_module(module)
        finally:
            if self._after is not None:
                self._after(module)

    def __getattr__(self, name):  # get_source, is_package, ... of the real loader
        return getattr(self._loader, name)


class ModuleExecHooks(importlib.abc.MetaPathFinder):
    """``hooks.add("pkg.mod", before=..., after=...)``; ``hooks.activate()`` puts it first in
    ``sys.meta_path``, ``hooks.deactivate()`` removes it."""

    def __init__(self) -> None:
        self._hooks: dict[str, tuple[Hook | None, Hook | None]] = {}

    def add(self, name: str, before: Hook | None = None, after: Hook | None = None) -> None:
        self._hooks[name] = (before, after)

    def names(self) -> list[str]:
        return list(self._hooks)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None:
            return spec
        before, after = self._hooks[fullname]
        spec.loader = _WrappedLoader(spec.loader, before, after)
        return spec

    def activate(self) -> None:
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def deactivate(self) -> None:
        while self in sys.meta_path:
            sys.meta_path.remove(self)
