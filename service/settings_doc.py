"""The settings reference (``docs/settings.md``), generated from :class:`service.config.Settings`.

Every ``FER_*`` setting gets one row: its environment variable, type (with the bounds the
validator enforces), default and description, all read from ``Settings.model_fields``, so the
table cannot drift from the code. The table sits between two marker comments in the document;
the prose around it is kept as written.

    python -m service.settings_doc            # print the table
    python -m service.settings_doc --write    # rewrite the table in docs/settings.md
    python -m service.settings_doc --check    # exit 1 if docs/settings.md is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from service.config import Settings

__all__ = ["BEGIN", "DOC_PATH", "END", "REGENERATE", "env_name", "settings_table", "update_document"]

#: Where the generated table lives (in a checkout).
DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
#: The command that rewrites it.
REGENERATE = "python -m service.settings_doc --write"
BEGIN = f"<!-- settings table: generated from service.config.Settings by `{REGENERATE}`; do not edit -->"
END = "<!-- end of settings table -->"

_REPO = Path(__file__).resolve().parents[1]
_MIB = 2**20


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable a field is read from (``FER_`` + its name, upper case)."""
    alias = field.validation_alias or field.alias
    if isinstance(alias, str):
        return alias.upper()
    return (str(Settings.model_config.get("env_prefix", "")) + name).upper()


def settings_table() -> str:
    """The markdown table: one row per field of :class:`Settings`, in declaration order."""
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        env = env_name(name, field)
        cells = (f"`{env}`", _type_cell(field), _default_cell(name, field),
                 _cell(_description(env, field)))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def update_document(text: str) -> str:
    """``text`` with the table between :data:`BEGIN` and :data:`END` regenerated.

    Raises:
        ValueError: when the markers are missing or out of order.
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the settings document needs the marker lines {BEGIN!r} and {END!r}, in that order")
    return text[: start + len(BEGIN)] + "\n\n" + settings_table() + "\n" + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.settings_doc",
                                description="Render the FER_* settings table from service.config.Settings")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the table in the document")
    mode.add_argument("--check", action="store_true", help="exit 1 if the document's table is out of date")
    p.add_argument("--doc", type=Path, default=DOC_PATH, help=f"the document (default {DOC_PATH})")
    args = p.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(settings_table())
        return 0
    current = args.doc.read_text(encoding="utf-8")
    wanted = update_document(current)
    if args.check:
        if current != wanted:
            sys.stderr.write(f"{args.doc} is out of date with service.config.Settings; run `{REGENERATE}`\n")
            return 1
        return 0
    if current != wanted:
        args.doc.write_text(wanted, encoding="utf-8")
        sys.stdout.write(f"rewrote the settings table in {args.doc}\n")
    return 0


# --- cells ----------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Plain text made safe for one table cell: pipes escaped, and ``<`` as an entity, so a
    placeholder such as <name> is shown, not taken for an HTML tag."""
    text = " ".join(text.split())
    return text.replace("|", "\\|").replace("<", "&lt;")


def _description(env: str, field: FieldInfo) -> str:
    """The field's description without a leading ``FER_NAME:`` (the row already names it)."""
    text = " ".join((field.description or "").split())
    for sep in (":", ","):
        if text.startswith(env + sep):
            return text[len(env) + 1:].strip()
    return text


def _num(value: float) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)


def _type_name(tp: object) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        names = [f"`{a}`" for a in args]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in rest)
        return f"{inner}, optional" if len(rest) < len(args) else inner
    if origin is dict:
        key, value = args or (str, object)
        return f"JSON object ({_type_name(key)} → {_type_name(value)})"
    if origin in (list, tuple, set, frozenset):
        return f"JSON list of {_type_name(args[0]) if args else 'values'}"
    return {bool: "bool", int: "int", float: "float", str: "str", Path: "path",
            SecretStr: "secret str"}.get(tp, getattr(tp, "__name__", str(tp)))


def _bounds(field: FieldInfo) -> str:
    low = high = None
    for m in field.metadata:
        for attr, sign in (("ge", "["), ("gt", "(")):
            if getattr(m, attr, None) is not None:
                low = (sign, getattr(m, attr))
        for attr, sign in (("le", "]"), ("lt", ")")):
            if getattr(m, attr, None) is not None:
                high = (sign, getattr(m, attr))
    if low and high:
        return f"{low[0]}{_num(low[1])}, {_num(high[1])}{high[0]}"
    if low:
        return ("≥ " if low[0] == "[" else "> ") + _num(low[1])
    if high:
        return ("≤ " if high[0] == "]" else "< ") + _num(high[1])
    return ""


def _type_cell(field: FieldInfo) -> str:
    bounds = _bounds(field)
    return _type_name(field.annotation).replace("|", "\\|") + (f", {bounds}" if bounds else "")


def _shown_path(path: Path) -> str:
    """A default path without this machine in it: inside the checkout relative to it, under
    the home folder as ``~/...``."""
    home = Path.home()
    for base, shown in ((_REPO, None), (home, "~")):
        if len(base.parts) > 1 and path.is_relative_to(base):
            rel = path.relative_to(base).as_posix()
            return rel if shown is None else f"{shown}/{rel}"
    return path.as_posix()


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return _shown_path(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


def _default_cell(name: str, field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "(set, not shown)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        return f"`{_shown_path(value)}`"
    if isinstance(value, dict | list | tuple | set | frozenset):
        return f"`{json.dumps(_jsonable(value))}`"
    if isinstance(value, int) and name.endswith("_bytes") and value % _MIB == 0:
        return f"`{value}` ({value // _MIB} MiB)"
    if isinstance(value, float):
        return f"`{_num(value)}`"
    return f"`{value}`".replace("|", "\\|")


if __name__ == "__main__":
    raise SystemExit(main())
