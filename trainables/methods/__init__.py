"""The method registry: the only place that knows a tuning method.

Every module of this package that defines `METHOD` (a `stages.Method`) is a method,
found here at import: full, lora, qlora, mma/. Adding a fifth is one module plus its
space file; `register` adds one from elsewhere (a test's toy method).
"""

from __future__ import annotations

import importlib
import pkgutil

from trainables.methods.stages import (ADAPTER, FROZEN, FULL, LORA, PARTS, STAGE1, Method, StageError,
                                       apply_stage, check_stage, dir_mb, part_of)

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (its name must be new); returns it."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "stages":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "METHOD", None), Method):
            register(module.METHOD)


def method_fields() -> set[str]:
    """TrialConfig fields that some method declares as its own (the others every trial shares)."""
    return {f for m in METHODS.values() for f in m.fields}


_discover()

__all__ = ["ADAPTER", "FROZEN", "FULL", "LORA", "METHODS", "PARTS", "STAGE1", "Method", "StageError", "apply_stage",
           "check_stage", "dir_mb", "method_fields", "part_of", "register"]
