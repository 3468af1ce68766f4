"""Package namespaces that import a module on first use of one of its names.

A package's ``__init__`` declares which module each public name lives in; ``import gpas_probe`` (or
``gpas_probe.store``) then costs nothing, and the commands that only read parquet or draw never import
torch. ``from gpas_probe import train`` imports ``gpas_probe.training`` at that moment, as before.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable


def lazy_exports(package: str, modules: dict[str, Iterable[str]]) -> tuple[Callable[[str], object],
                                                                          Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` (PEP 562): ``modules`` maps a module to the names
    it exports. A name is imported once, then kept as the package's own attribute."""
    where = {name: module for module, names in modules.items() for name in names}

    def getattr_(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return getattr_, dir_
