"""Config dataclasses as the one place per option: a field's default, help, CLI flag and type check.

Declare a field with `opt(default, help, min=, max=, above=, below=, choices=)`; `add_flags` writes each
field's `--flag` (its name with dashes; `flag=` in `opt` renames it) and `from_dict` builds the config from
a dict (a JSON/YAML file, flags merged over it) refusing unknown keys and values of the wrong type, then
calls the config's `validate()`, which starts with `check_fields` (every declared range and choice, one
message form for all) and adds the checks that tie fields together. A flag left out keeps the file's or the
default's value. Every subcommand's arguments are such a dataclass: `opt(REQUIRED, ...)` is a required
flag, or with `positional=True` a positional argument.

    int, float, str  --name VALUE          bool         --name / --no-name (a command's own: --name)
    list[int|float]  --name 1,2,3          list[str]    --name VALUE (repeatable, appends);
                                                        with opt(comma=True): --name A,B,C
    X | None         as X (None only from a file or the default)
    dict             file only (no flag)
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, field, fields

from .errors import ProgsaeError

REQUIRED = MISSING  # opt(REQUIRED, ...): no default; the command line must give it


def opt(
    default,
    help: str,
    flag: str | None = None,
    min=None,
    max=None,
    choices=None,
    *,
    above=None,
    below=None,
    positional: bool = False,
    comma: bool = False,
    const=None,
    metavar: str | None = None,
):
    """A config field: its default (a list or dict is copied per instance; REQUIRED: none), help, optional
    flag name, and its range: `min` / `max` (inclusive), `above` / `below` (exclusive; for a list, of every
    item) or `choices`. How its flag reads: `positional` (an argument, not a flag), `comma` (a list[str] as
    A,B,C), `const` (the flag alone, without a value, means `const`), `metavar` (the value's name in --help)."""
    meta = {"help": help, "flag": flag, "min": min, "max": max, "choices": choices, "above": above, "below": below,
            "positional": positional, "comma": comma, "const": const, "metavar": metavar}  # fmt: skip
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _kind(cls, f) -> tuple[type, bool, bool]:
    """(base type, is a list, may be None) of a field, from its annotation."""
    t = typing.get_type_hints(cls)[f.name]
    optional = False
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        optional, t = True, args[0]
    if typing.get_origin(t) is list:
        return typing.get_args(t)[0], True, optional
    return typing.get_origin(t) or t, False, optional


def numbers(base: type):
    """An argparse type: comma-separated numbers of type `base`."""

    def parse(text: str) -> list:
        try:
            return [base(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {base.__name__}s, got {text!r}") from None

    return parse


def flag_name(f) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def add_flags(
    parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), file: bool = True, preset: tuple | None = None
) -> None:
    """One argument per field of `cls` (help from `opt`, the default shown); every flag's default is None, so
    `given` tells the fields set on the command line from those left to the file or the default.

    file=True, a config that may also come from a file: its flags form a group saying so, and a boolean is
    --name / --no-name (to override a file's value either way). file=False, a command's own arguments: its
    flags sit with the command's, a boolean is a switch (--name), and `choices` are offered by argparse.
    preset: (its name, an instance of cls) whose values the help shows as the defaults, instead of the class's."""
    title = f"{cls.__name__} fields (flags override --config" + (f"; defaults of the {preset[0]} preset)" if preset else ")")
    target = parser.add_argument_group(title) if file else parser
    for f in fields(cls):
        base, is_list, _ = _kind(cls, f)
        if f.name in skip or base is dict:
            continue
        m, default = f.metadata, getattr(preset[1], f.name) if preset else _default(f)
        quiet = default in (None, [], "", MISSING) or (default is False and not file)
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help = m.get("help", "") + ("" if quiet else f" (default {shown})")
        if m.get("positional"):  # an optional one (a default given) may be left out
            target.add_argument(f.name, type=base, help=help, **({} if default is MISSING else {"nargs": "?"}))
            continue
        kw = {"dest": f.name, "default": None, "help": help}
        if default is MISSING:
            kw["required"] = True
        if base is bool:
            target.add_argument(flag_name(f), action=argparse.BooleanOptionalAction if file else "store_true", **kw)
        elif is_list and (base in (int, float) or m.get("comma")):
            target.add_argument(flag_name(f), type=numbers(base), metavar="X,X,...", **kw)
        elif is_list:
            target.add_argument(flag_name(f), action="append", type=base, metavar=base.__name__.upper(), **kw)
        else:
            choices = None if file else m.get("choices")
            if m.get("const") is not None:
                kw.update(nargs="?", const=m["const"])
            metavar = m.get("metavar") or (None if choices else base.__name__.upper())
            target.add_argument(flag_name(f), type=base, choices=choices, metavar=metavar, **kw)


def _default(f):
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def check_fields(cfg, what: str) -> None:
    """Every field of `cfg` inside its declared range (`opt(min=, max=, above=, below=, choices=)`), else one
    line naming it."""
    for f in fields(cfg):
        value, m = getattr(cfg, f.name), f.metadata
        base, is_list, _ = _kind(type(cfg), f)
        for v in value if is_list and isinstance(value, list) else [value]:
            if v is None:
                continue
            if base is int and not _is(v, int):
                raise ProgsaeError(f"{what}: {f.name} must be an integer, got {v!r}")
            if m.get("choices") is not None and v not in m["choices"]:
                *head, last = map(repr, m["choices"])
                raise ProgsaeError(
                    f"{what}: {f.name} must be {', '.join(head) + ' or ' if head else ''}{last}, got {v!r}"
                )
            if not _inside(v, m):
                raise ProgsaeError(f"{what}: {f.name} must be {_range(m, base)}, got {v!r}")


def _inside(v, m) -> bool:
    lo, hi, above, below = (m.get(k) for k in ("min", "max", "above", "below"))
    return not (
        lo is not None and v < lo or hi is not None and v > hi
        or above is not None and v <= above or below is not None and v >= below
    )  # fmt: skip


def _range(m, base: type) -> str:
    """A declared range in words: a positive integer, >= 0, < 1, in [0.5, 1), ..."""
    lo, left = (m["min"], "[") if m.get("min") is not None else (m.get("above"), "(")
    hi, right = (m["max"], "]") if m.get("max") is not None else (m.get("below"), ")")
    if (lo, left, hi, base) == (1, "[", None, int):
        return "a positive integer"
    if hi is None:
        return f"{'>=' if left == '[' else '>'} {lo}"
    if lo is None:
        return f"{'<=' if right == ']' else '<'} {hi}"
    return f"in {left}{lo}, {hi}{right}"


def given(cls, args: argparse.Namespace) -> dict:
    """The fields of `cls` set by flags on this command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def from_args(cls, args: argparse.Namespace, what: str):
    """The `cls` of a command line: its flags over its defaults, checked (`from_dict`)."""
    return from_dict(cls, given(cls, args), what)


def from_dict(cls, d: dict, what: str):
    """`cls(**d).validate()` (`check_fields` for a class without `validate`), refusing unknown keys and values
    of the wrong type in one line each."""
    if not isinstance(d, dict):
        raise ProgsaeError(f"{what}: expected a mapping of settings, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ProgsaeError(f"{what}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for name, value in d.items():
        base, is_list, optional = _kind(cls, known[name])
        if value is None and optional:
            continue
        items = value if is_list and isinstance(value, list) else [value]
        ok = (isinstance(value, list) or not is_list) and all(_is(v, base) for v in items)
        if not ok:
            want = f"a list of {base.__name__}" if is_list else base.__name__
            raise ProgsaeError(f"{what}: {name} must be {want}{' or null' if optional else ''}, got {value!r}")
    cfg = cls(**d)
    if not hasattr(cfg, "validate"):
        check_fields(cfg, what)
        return cfg
    return cfg.validate()


def _is(v, base: type) -> bool:
    if base is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if base is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, base)


def load_file(path) -> dict:
    """Settings from a JSON or YAML file (.yaml/.yml), one line on error."""
    from pathlib import Path

    from .files import load_json

    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        return load_json(path)
    import yaml

    try:
        d = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError as e:
        raise ProgsaeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise ProgsaeError(f"{path}: expected a YAML mapping of settings (file missing or empty?)")
    return d
