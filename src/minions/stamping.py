"""``minions stamp component-ids`` and ``minions doctor ids``: durable ids in user source.

Design note. Both read Python files with :mod:`ast` and never import them (a project may not
import without its deployment's environment). A component is a class whose bases name
``Minion``, ``Pipeline``, ``Resource`` or ``WorkerPool`` directly (``Minion[E, C]``,
``minions.Pipeline`` and so on); a subclass of your own base class is not recognised, which
``doctor`` cannot see either, so stamp such classes by hand.

Stamping only inserts lines: one ``@minion_id("<uuid4>")`` (or ``@pipeline_id``/
``@resource_id``) above each component that lacks one, indented like its class, and one
``from minions import ...`` line after the module's leading imports when a decorator name is
not imported yet. Nothing else in the file changes (line endings included), so the diff is
exactly those lines, and a second run changes nothing. The result must parse and must contain
the same classes, or the file is left untouched. Workflows saved before stamping are adopted
under the new ids when their orchestration next starts.
"""

from __future__ import annotations

import ast
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from minions.runtime.identity import validate_component_id

KIND_BY_BASE = {"Minion": "minion", "Pipeline": "pipeline", "Resource": "resource",
                "WorkerPool": "resource"}  # fmt: skip
DECORATOR_BY_KIND = {"minion": "minion_id", "pipeline": "pipeline_id", "resource": "resource_id"}
_SKIP_DIRS = {"__pycache__", "build", "dist", "node_modules", "site-packages", "venv"}


class StampError(Exception):
    """A path cannot be scanned or a file cannot be stamped safely; the message says which."""


@dataclass(frozen=True, slots=True)
class Component:
    """One component class found in a source file."""

    path: Path
    lineno: int  # of the ``class`` keyword
    name: str
    kind: str
    component_id: str | None  # the literal id of its decorator, if it has one
    has_decorator: bool
    insert_at: int  # 0-based line index for a new decorator: above the first existing one
    indent: str


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Subscript):
        return _name(node.value)
    if isinstance(node, ast.Call):
        return _name(node.func)
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else None


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "string"`` assignments (ids kept in a constant)."""
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and isinstance(node.value.value, str):
                    found[target.id] = node.value.value
    return found


def scan_source(source: str, path: Path) -> list[Component]:
    """Every component class of ``source``, in source order."""
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise StampError(f"{path}:{exc.lineno}: cannot parse: {exc.msg}") from None
    constants = _constants(tree)
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        kinds = {KIND_BY_BASE[n] for b in node.bases if (n := _name(b)) in KIND_BY_BASE}
        if len(kinds) != 1:
            continue
        kind = kinds.pop()
        marks = [d for d in node.decorator_list if _name(d) == DECORATOR_BY_KIND[kind]]
        value = None
        if marks and isinstance(marks[0], ast.Call) and marks[0].args:
            arg = marks[0].args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                value = arg.value
            elif isinstance(arg, ast.Name):
                value = constants.get(arg.id)
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        text = lines[node.lineno - 1]
        found.append(
            Component(path, node.lineno, node.name, kind, value, bool(marks), first - 1,
                      text[: len(text) - len(text.lstrip())])
        )  # fmt: skip
    return sorted(found, key=lambda c: c.lineno)


def python_files(paths: Iterable[Path]) -> list[Path]:
    """The ``.py`` files of ``paths`` (directories recursively, hidden and build dirs skipped)."""
    files: list[Path] = []
    for root in paths:
        if root.is_file():
            if root.suffix != ".py":
                raise StampError(f"{root} is not a Python source file (.py)")
            files.append(root)
        elif root.is_dir():
            files += sorted(
                p for p in root.rglob("*.py")
                if not any(part.startswith(".") or part in _SKIP_DIRS
                           for part in p.relative_to(root).parts[:-1])
            )  # fmt: skip
        else:
            raise StampError(f"no such file or directory: {root}")
    return files


# --- stamping ---------------------------------------------------------------------------------


def stamp_source(source: str, path: Path, new_id: Any = uuid.uuid4) -> tuple[str, list[Component]]:
    """The stamped source and the components that got an id (``source`` itself if none)."""
    missing = [c for c in scan_source(source, path) if not c.has_decorator]
    if not missing:
        return source, []
    newline = "\r\n" if "\r\n" in source else "\n"
    lines = source.splitlines(keepends=True)
    for comp in sorted(missing, key=lambda c: c.insert_at, reverse=True):
        decorator = DECORATOR_BY_KIND[comp.kind]
        lines.insert(comp.insert_at, f'{comp.indent}@{decorator}("{new_id()}"){newline}')
    needed = sorted({DECORATOR_BY_KIND[c.kind] for c in missing} - _imported(source))
    if needed:
        lines.insert(_import_line(source), f"from minions import {', '.join(needed)}{newline}")
    stamped = "".join(lines)
    after = scan_source(stamped, path)
    if len(after) != len(scan_source(source, path)) or not all(c.has_decorator for c in after):
        raise StampError(f"{path}: stamping would not round-trip; the file was left untouched")
    return stamped, missing


def _imported(source: str) -> set[str]:
    """Names bound at module level by ``from minions import ...``."""
    tree = ast.parse(source)
    return {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "minions"
        for alias in node.names
    }


def _import_line(source: str) -> int:
    """0-based line after the module's leading docstring and imports."""
    tree = ast.parse(source)
    index = 0
    for pos, node in enumerate(tree.body):
        is_doc = pos == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if isinstance(node, ast.Import | ast.ImportFrom) or is_doc:
            index = node.end_lineno or node.lineno
        else:
            break
    return index


def stamp_paths(paths: Sequence[Path], *, dry_run: bool, out: TextIO) -> int:
    """Stamp every file; print one line per component stamped. Returns the count."""
    total = 0
    for path in python_files(paths):
        raw = path.read_bytes()
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise StampError(f"{path} is not UTF-8 text; left untouched") from None
        stamped, done = stamp_source(source, path)
        if not done:
            continue
        if not dry_run:
            path.write_bytes(stamped.encode("utf-8"))
        verb = "would stamp" if dry_run else "stamped"
        for comp in done:
            out.write(
                f"{path}:{comp.lineno}: {verb} {comp.name} with @{DECORATOR_BY_KIND[comp.kind]}\n"
            )
        total += len(done)
    out.write(f"{total} component(s) {'to stamp' if dry_run else 'stamped'}\n")
    return total


# --- doctor -----------------------------------------------------------------------------------


def doctor_paths(paths: Sequence[Path], out: TextIO) -> int:
    """Report components without an id, with an invalid one, and ids used twice in a kind.
    Returns the number of problems (the exit code is 1 when there are any)."""
    components = [
        c for path in python_files(paths) for c in scan_source(path.read_text("utf-8"), path)
    ]
    problems: list[str] = []
    seen: dict[tuple[str, str], Component] = {}
    for comp in components:
        where = f"{comp.path}:{comp.lineno}: {comp.name} ({comp.kind})"
        decorator = DECORATOR_BY_KIND[comp.kind]
        if not comp.has_decorator:
            problems.append(f"{where} has no @{decorator}: run `minions stamp component-ids`")
            continue
        if comp.component_id is None:
            problems.append(f"{where}: @{decorator} must be given a string literal UUID")
            continue
        try:
            validate_component_id(comp.component_id)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        first = seen.setdefault((comp.kind, comp.component_id), comp)
        if first is not comp:
            problems.append(
                f"{where}: duplicate {comp.kind} id {comp.component_id} (also {first.name} at "
                f"{first.path}:{first.lineno}); give one of them a new id"
            )
    for line in problems:
        out.write(line + "\n")
    out.write(f"{len(components)} component(s) checked, {len(problems)} problem(s)\n")
    return len(problems)


# --- the CLI ------------------------------------------------------------------------------------


def add_commands(commands: Any) -> None:
    """Register ``stamp component-ids`` and ``doctor ids`` on the ``minions`` parser."""
    stamp = commands.add_parser("stamp", help="add durable ids to your source (component-ids)")
    stamp_what = stamp.add_subparsers(title="what", metavar="WHAT", required=True)
    ids = stamp_what.add_parser(
        "component-ids",
        help="add @minion_id/@pipeline_id/@resource_id where missing",
        description="Insert a generated @minion_id/@pipeline_id/@resource_id decorator above "
        "every Minion, Pipeline and Resource class that has none, and the import it needs. "
        "Idempotent; only adds lines.",
    )
    ids.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories")
    ids.add_argument("--dry-run", action="store_true", help="show what would be stamped")
    ids.set_defaults(handler=_cmd_stamp)
    doctor = commands.add_parser("doctor", help="check a project (ids)")
    doctor_what = doctor.add_subparsers(title="what", metavar="WHAT", required=True)
    check = doctor_what.add_parser(
        "ids",
        help="report missing, invalid and duplicate component ids (exit 1 if any)",
        description="Read-only: report components without an id, with an invalid id, and ids "
        "used by two components of one kind. Exit code 1 when there is any.",
    )
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories")
    check.set_defaults(handler=_cmd_doctor)


def _cmd_stamp(ns: Any) -> int:
    import sys

    from minions.cli import EXIT_OK, UsageError

    try:
        stamp_paths(ns.paths, dry_run=ns.dry_run, out=sys.stdout)
    except StampError as exc:
        raise UsageError(f"minions stamp component-ids: {exc}") from None
    return EXIT_OK


def _cmd_doctor(ns: Any) -> int:
    import sys

    from minions.cli import EXIT_FAILED, EXIT_OK, UsageError

    try:
        problems = doctor_paths(ns.paths, out=sys.stdout)
    except StampError as exc:
        raise UsageError(f"minions doctor ids: {exc}") from None
    return EXIT_FAILED if problems else EXIT_OK
