"""The one parser of ``"package.module:Qualified.Name"`` targets, for every part of Minions.

Gru resolves pipeline and minion specs with it, worker processes their service, and the CLI its
launch function. It imports nothing but :mod:`importlib`, because a worker process imports it
before its first call and must not pay for the orchestration runtime.

Errors are :class:`ImportTargetError` (a ``ValueError``) with a sentence that names the target
and what to write instead; the import's own exception is chained.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class ImportTargetError(ValueError):
    """A target string is malformed, or its module or attribute cannot be imported."""


def split_target(spec: str, *, what: str = "target") -> tuple[str, str | None]:
    """``"pkg.mod:Cls.Inner"`` -> ``("pkg.mod", "Cls.Inner")``; ``"pkg.mod"`` -> ``("pkg.mod",
    None)``. Each dotted part must be a Python identifier."""
    if not isinstance(spec, str):
        raise ImportTargetError(f"{what} must be a string, got {type(spec).__name__}")
    module_name, sep, qualname = spec.strip().partition(":")
    parts = module_name.split(".") + (qualname.split(".") if sep else [])
    if not all(part.isidentifier() for part in parts):
        raise ImportTargetError(
            f"{what} {spec!r} is not of the form 'package.module:ClassName' or 'package.module'"
        )
    return module_name, (qualname if sep else None)


def import_module(module_name: str, *, what: str = "target") -> ModuleType:
    """Import ``module_name``; a missing module or a failing import is an ImportTargetError."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportTargetError(f"cannot import {what} module {module_name!r}: {exc}") from exc


def attribute(module: ModuleType, qualname: str, *, what: str = "target") -> object:
    """Walk ``qualname`` (``"Outer.Inner"``) from ``module``."""
    obj: object = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportTargetError(
                f"cannot import {what} '{module.__name__}:{qualname}': {exc}"
            ) from exc
    return obj


def import_object(spec: str, *, what: str = "target") -> object:
    """Resolve a ``"module:Qualified.Name"`` string (the colon is required here)."""
    module_name, qualname = split_target(spec, what=what)
    if qualname is None:
        raise ImportTargetError(f"{what} must be 'module:Name', got {spec!r}")
    return attribute(import_module(module_name, what=what), qualname, what=what)
