"""Options shared by every frontend: one dataclass per command, read from flags and a TOML file, checked alike.

A config is a dataclass whose fields are made with :func:`option`: the field's default, help text
(with the paper's value where the paper fixes one), allowed values and range live in one place, and
:func:`config_parser` turns them into command-line flags, :func:`parse_config` reads the flags and a
``--config FILE`` (TOML) into the dataclass, :func:`check_fields` checks the values and
:func:`to_toml` writes a file that ``--config`` reads back. Precedence: the dataclass defaults <
the TOML file < flags given on the command line. A field made with :func:`nested` holds another
config whose fields appear as flags (and TOML keys) of their own; :func:`same_as` repeats another
config's option (its default, help and range) so that a default exists once.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, Iterator

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (AUTOMATIC1111's): the same parser as a package
    import tomli as tomllib

_LIMIT_TEXT = {"at_least": ">= {}", "above": "> {}", "below": "< {}", "at_most": "<= {}"}
_LIMIT_TEST = {"at_least": lambda v, x: v >= x, "above": lambda v, x: v > x, "below": lambda v, x: v < x,
               "at_most": lambda v, x: v <= x}
_KINDS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
_PARSERS = {"int": int, "float": float, "str": str, "Path": Path}
SEED_LIMITS = {"at_least": 0, "at_most": 2**63 - 1}  # what a torch.Generator takes
CONFIG_HELP = "TOML file with any of the options below (flags override it)."


def flag_name(name: str) -> str:
    """The command-line flag of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_value(flag: str, value, kind: str, limits: dict | None = None, choices: tuple | None = None) -> None:
    """Raise a one-line ValueError naming ``flag`` when ``value`` is not a ``kind`` within ``limits``/``choices``.

    ``kind`` is ``int``, ``float``, ``str``, ``bool`` or ``list[<kind>]`` (each element checked). Floats
    must be finite. Every frontend's options go through this check before anything is loaded.
    """
    if kind.startswith("list["):
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{flag}: expected a non-empty list, got {value!r}.")
        for item in value:
            check_value(flag, item, kind[5:-1], limits, choices)
        return
    wanted = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[kind]
    if not isinstance(value, _KINDS[kind]) or (kind != "bool" and isinstance(value, bool)):
        raise ValueError(f"{flag}: expected {wanted}, got {value!r}.")
    if kind == "float" and not math.isfinite(value):
        raise ValueError(f"{flag} {value}: give a finite number.")
    if choices and value not in choices:
        raise ValueError(f"{flag} {value!r}: choose one of {', '.join(map(str, choices))}.")
    failed = [key for key, bound in (limits or {}).items() if not _LIMIT_TEST[key](value, bound)]
    if failed:
        allowed = " and ".join(_LIMIT_TEXT[key].format(bound) for key, bound in limits.items())
        raise ValueError(f"{flag} {value}: out of range; give {wanted} {allowed}.")


def option(default: Any = MISSING, help: str = "", choices: tuple | None = None, *, at_least=None, above=None,
           below=None, at_most=None, flag: str | None = None, metavar: str | None = None, const: Any = None,
           repeat: bool = False) -> Any:
    """A config field: its default (none: required), help text, allowed ``choices`` or range, and flag.

    ``flag`` overrides the flag derived from the name (``guidance_scale`` -> ``--cfg``); ``const`` makes
    the flag's value optional (a bare flag means ``const``); ``repeat`` collects a repeatable flag into a
    list instead of taking several values after one flag.
    """
    limits = {"at_least": at_least, "above": above, "below": below, "at_most": at_most}
    metadata = {"help": help, "choices": choices, "limits": {k: v for k, v in limits.items() if v is not None},
                "flag": flag, "metavar": metavar, "const": const, "repeat": repeat}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def nested(config_class: type) -> Any:
    """A field holding a whole config of ``config_class``, whose fields are options of the outer config."""
    return field(default_factory=config_class, metadata={"nested": config_class})


def field_of(config_class: type, name: str) -> Field:
    """The field ``name`` of a config class (its ``metadata`` holds help, choices and limits)."""
    return next(spec for spec in fields(config_class) if spec.name == name)


def same_as(config_class: type, name: str, **changes) -> Any:
    """An option with the default, help and limits of ``config_class``'s field ``name`` (``changes`` override)."""
    spec = field_of(config_class, name)
    default = spec.default if spec.default is not MISSING else spec.default_factory()
    settings = {key: value for key, value in spec.metadata.items() if key not in ("limits",)}
    return option(**{"default": default, **settings, **spec.metadata["limits"], **changes})


def _kind(spec: Field) -> str:
    """The value kind of a field: its annotation without ``| None`` (``int``, ``list[str]``, ``Path`` ...).

    Config modules start with ``from __future__ import annotations``, so annotations are their source text.
    """
    return str(spec.type).split(" | ")[0]


def options_of(config_class: type) -> Iterator[Field]:
    """Every option field of a config, those of :func:`nested` configs in place of the nesting field."""
    for spec in fields(config_class):
        if "nested" in spec.metadata:
            yield from options_of(spec.metadata["nested"])
        elif "help" in spec.metadata:
            yield spec


def flag_of(spec: Field) -> str:
    """The flag of an option: its own ``flag`` or the one derived from its name."""
    return spec.metadata.get("flag") or flag_name(spec.name)


def check_fields(config) -> None:
    """Check every set option of ``config`` (type, finiteness, range, choices); raise a one-line ValueError."""
    for spec in fields(config):
        value = getattr(config, spec.name)
        if "nested" in spec.metadata:
            check_fields(value)
        elif "help" in spec.metadata and value not in (None, []) and _kind(spec) != "Path":
            check_value(flag_of(spec), value, _kind(spec), spec.metadata["limits"], spec.metadata["choices"])


def _help(spec: Field) -> str:
    text = spec.metadata["help"]
    if spec.default is MISSING and spec.default_factory is MISSING:
        return text + " (required)"
    if "default" in text:
        return text
    default = spec.default if spec.default is not MISSING else spec.default_factory()
    if isinstance(default, list):
        default = " ".join(map(str, default))
    shown = {None: "none", "": "empty"}.get(default, default) if not isinstance(default, (int, float)) else default
    return f"{text} (default: {shown})"


def add_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per option of ``config_class``; unset flags leave no value (so a TOML file can set it)."""
    for spec in options_of(config_class):
        kind, meta = _kind(spec), spec.metadata
        settings: dict[str, Any] = {"help": _help(spec), "default": argparse.SUPPRESS, "dest": spec.name}
        if kind != "bool" and not meta["choices"]:
            settings["metavar"] = flag_of(spec).lstrip("-").replace("-", "_").upper()
        for key in ("choices", "metavar", "const"):
            if meta[key] is not None:
                settings[key] = meta[key]
        if kind == "bool":
            settings["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("list["):
            settings["type"] = _PARSERS[kind[5:-1]]
            settings["action" if meta["repeat"] else "nargs"] = "append" if meta["repeat"] else "+"
        else:
            settings["type"] = _PARSERS.get(kind, str)
            if meta["const"] is not None:
                settings["nargs"] = "?"
        parser.add_argument(flag_of(spec), **settings)


def config_parser(config_class: type, description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``--config FILE`` and one flag per option of ``config_class``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=CONFIG_HELP)
    add_options(parser, config_class)
    return parser


class UnknownOptionError(ValueError):
    """A config file names an option the command does not have."""


def read_toml(path: str | Path, config_class: type) -> dict[str, Any]:
    """The options a TOML file sets, by field name or flag (``-`` or ``_``: ``guidance_scale`` or ``cfg``).

    Raises ValueError for an unreadable file, :class:`UnknownOptionError` for a key that is no option.
    """
    try:
        with open(path, "rb") as handle:
            values = {key.replace("-", "_"): value for key, value in tomllib.load(handle).items()}
    except (OSError, ValueError) as error:  # missing file, or TOML syntax (TOMLDecodeError is a ValueError)
        raise ValueError(f"--config {path}: cannot read it as TOML ({error}); fix or remove the file.") from None
    names = {}
    for spec in options_of(config_class):
        names[spec.name] = names[flag_of(spec)[2:].replace("-", "_")] = spec.name
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UnknownOptionError(f"--config {path}: unknown option(s) {', '.join(unknown)}; the options are the flags "
                                 "of --help without the leading dashes.")
    return {names[key]: value for key, value in values.items()}


def build_config(config_class: type, values: dict[str, Any]):
    """``config_class`` from flat option values (those of :func:`nested` configs included); ValueError if one
    without a default is missing."""
    arguments = {}
    for spec in fields(config_class):
        if "nested" in spec.metadata:
            inner = {spec.name for spec in options_of(spec.metadata["nested"])}
            arguments[spec.name] = build_config(spec.metadata["nested"],
                                                {k: v for k, v in values.items() if k in inner})
        elif spec.name in values:
            value = values[spec.name]
            arguments[spec.name] = Path(value) if _kind(spec) == "Path" and isinstance(value, str) else value
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise ValueError(f"{flag_of(spec)} is required (flag or config file).")
    return config_class(**arguments)


def parse_config(config_class: type, parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """(config, the other parsed flags) from the command line: defaults < ``--config`` TOML < flags.

    An unreadable config file or a missing required option is a usage error (exit 2, one line), an unknown
    option in the file ends the command with that one line; the values themselves are checked by the
    config's own ``validate``.
    """
    arguments = vars(parser.parse_args(argv))
    own = {spec.name for spec in options_of(config_class)}
    values: dict[str, Any] = {}
    try:
        if arguments.get("config"):
            values = read_toml(arguments["config"], config_class)
        values.update({key: value for key, value in arguments.items() if key in own})
        config = build_config(config_class, values)
    except UnknownOptionError as error:
        raise SystemExit(f"error: {error}") from None
    except ValueError as error:
        parser.error(str(error))
    return config, {key: value for key, value in arguments.items() if key not in own and key != "config"}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def to_toml(config) -> str:
    """The config's options as a TOML document that ``--config`` reads back (unset ones left out)."""
    lines = []
    for spec in fields(config):
        value = getattr(config, spec.name)
        if "nested" in spec.metadata:
            lines.append(to_toml(value).rstrip("\n"))
        elif "help" in spec.metadata and value is not None:
            lines.append(f"{spec.name} = {_toml_value(value)}")
    return "\n".join(line for line in lines if line) + "\n"


def save_config(config, path: str | Path) -> None:
    """Write :func:`to_toml` of ``config`` to ``path``."""
    Path(path).write_text(to_toml(config), encoding="utf-8")


def parse_resolution(text: str) -> tuple[int, int] | None:
    """``"512"`` -> (512, 512); ``"704x1024"`` -> (704, 1024) as (width, height); ``"auto"`` -> None (the model
    family's default, once the model is known)."""
    if str(text).lower() == "auto":
        return None
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"Resolution {text!r}: use N or WxH, e.g. 512 or 704x1024.") from None
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or any(size <= 0 or size % 8 for size in sizes):
        raise ValueError(f"Resolution {text!r}: width and height must be positive multiples of 8.")
    return sizes[0], sizes[1]
