"""Named, declared things a run configuration picks by name: mixture variants, routers and
search strategies (merge methods have their own, richer registry in ``model_glue.merge``).

Each kind lives in a package with one module per entry; :meth:`Registry.load` imports every
module of the package, whose declarations register themselves, so adding one is one file.
Declaration modules stay light (pydantic and the standard library): the run configuration
reads them, and the work itself imports torch and transformers when it runs.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Entries of one kind by name, filled by the modules of ``package``."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind, self.package = kind, package
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, entry: T) -> T:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def load(self) -> Registry[T]:
        if not self._loaded:
            self._loaded = True
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{info.name}")
        return self

    def __getitem__(self, name: str) -> T:
        entries = self.load()._entries
        if name not in entries:
            raise KeyError(f"unknown {self.kind} {name!r} (allowed: {', '.join(self.names())})")
        return entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.load()._entries

    def __iter__(self) -> Iterator[T]:
        return iter(sorted(self.load()._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self.load()._entries)
