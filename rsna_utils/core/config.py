"""Settings spelled once: a config is a dataclass whose fields are made by `setting(default,
help, ...)`, and everything else derives from those fields:

- checks on creation (`Config.check_fields`: type, choices, range; one line per error naming
  the field, the value and what to give instead);
- command-line flags (`add_flags`: `--batch-size` from `batch_size`, its type, default, choices
  and help; `given_flags` reads back only the flags that were given);
- YAML files (`Config.from_yaml`) and dicts (`Config.from_dict`), unknown keys refused;
- notebook parameters (`Config.from_namespace(globals())` picks the names that are fields).

`TrainConfig` (rsna_utils.learn.train) and `PredictConfig` (rsna_utils.infer.predict) are built this way.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import operator
import os
import types
import typing
from pathlib import Path

from rsna_utils.core.errors import RsnaError

_NO_DEFAULT = dataclasses.MISSING


def setting(default=_NO_DEFAULT, help: str = "", *, choices: tuple | None = None,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, flags: tuple[str, ...] = (), parse=None,
            negate: str | None = None, cli: bool = True, repeat: bool = False,
            metavar: str | None = None):
    """A config field. `choices` / `ge` `gt` `le` `lt`: checked on creation (None always passes
    where the type allows it). Command line: `--field-name` plus any `flags` aliases; `parse`
    turns the flag's text into the value; `negate="--quiet"` makes a bool field a flag that
    sets it False; `repeat`: a list field whose flag is given once per value (`-p a=1 -p b=2`)
    instead of taking several values; cli=False: YAML and Python only (dicts)."""
    meta = dict(help=help, choices=choices, ge=ge, gt=gt, le=le, lt=lt, flags=flags, parse=parse,
                negate=negate, cli=cli, repeat=repeat, metavar=metavar)
    if isinstance(default, (list, dict)):      # a fresh copy per instance
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Config:
    """Base of the config dataclasses. Subclasses set KIND ("training", ...) for messages and
    call `self.check_fields()` in their `__post_init__`, then check what spans fields."""

    KIND = "config"
    ERROR = RsnaError            # what a bad field raises (a subclass of RsnaError)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - set(cls.field_names())
        if unknown:
            raise RsnaError(f"unknown {cls.KIND} option(s) {sorted(unknown)}; valid: "
                            f"{sorted(cls.field_names())}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides):
        """The YAML's fields, then `overrides` (command-line flags win over the file)."""
        import yaml
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise RsnaError(f"{path}: config file not found") from None
        if not isinstance(d, dict):
            raise RsnaError(f"{path}: expected a mapping of {cls.KIND} options, got "
                            f"{type(d).__name__}")
        d.update(overrides)
        return cls.from_dict(d)

    @classmethod
    def from_namespace(cls, namespace: typing.Mapping, **overrides):
        """The config from the names of `namespace` that are fields (a notebook's `globals()`
        after its parameters cell), then `overrides`; other names are ignored."""
        d = {k: namespace[k] for k in cls.field_names() if k in namespace}
        d.update(overrides)
        return cls(**d)

    # -- checks ---------------------------------------------------------------------------
    def check_fields(self) -> None:
        """Type, choices and range of every field; path-likes given for str fields become str
        (config.json and checkpoints hold plain values), tuples given for lists become lists."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            allowed = _types(hints[f.name])
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike) and str in allowed:
                value = os.fspath(value)
            if isinstance(value, tuple) and list in allowed and tuple not in allowed:
                value = list(value)
            setattr(self, f.name, value)
            try:
                _check_value(f.name, value, allowed, f.metadata)
            except RsnaError as e:
                raise self.ERROR(str(e)) from None


def _types(hint) -> tuple:
    """int | None -> (int, NoneType); list[str] -> (list,)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) \
        else (hint,)
    return tuple(typing.get_origin(a) or a for a in args)


def _kind(allowed: tuple) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "a mapping", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in allowed))


def _check_value(name: str, value, allowed: tuple, meta) -> None:
    if value is None and type(None) in allowed:
        return
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok and float in allowed and isinstance(value, int) and not isinstance(value, bool):
        ok = True                                    # 1 for a float field
    if not ok:
        raise RsnaError(f"{name}={value!r}: give {_kind(allowed)}")
    choices = meta.get("choices")
    if choices and value not in choices:
        listed = [str(c) for c in choices]
        raise RsnaError(f"{name}={value!r}: choose {', '.join(listed[:-1])} or {listed[-1]}")
    bounds = [(op, meta[op]) for op in _OPS if meta.get(op) is not None]
    if isinstance(value, (int, float)) and not all(_OPS[op](value, b) for op, b in bounds):
        kind = "an integer" if int in allowed and float not in allowed else "a number"
        raise RsnaError(f"{name}={value!r}: give {kind} {_range_text(bounds)}")


_OPS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}
_SYMBOL = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _range_text(bounds: list[tuple[str, float]]) -> str:
    """[("ge", 0), ("lt", 1)] -> "in [0, 1)"; [("gt", 0)] -> "> 0"."""
    if len(bounds) == 2:
        (lo, a), (hi, b) = bounds
        return f"in {'[' if lo == 'ge' else '('}{a}, {b}{']' if hi == 'le' else ')'}"
    return " and ".join(f"{_SYMBOL[op]} {b}" for op, b in bounds)


# ----------------------------------------------------------------------------------------
# Command-line flags
# ----------------------------------------------------------------------------------------

def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: give true or false")


def add_flags(parser: argparse.ArgumentParser, cls: type[Config]) -> None:
    """One flag per field of `cls` (not cli=False ones): `--name-with-dashes` (+ aliases),
    typed from the annotation; bools take an optional true/false (`--tta` alone is true);
    lists take several values; fields without a default are required. Defaults are not set on
    the namespace: `given_flags` returns only what was typed, so a YAML below can fill the rest."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        m = f.metadata
        if not m.get("cli", True):
            continue
        required = f.default is _NO_DEFAULT and f.default_factory is _NO_DEFAULT
        default = None if required else (f.default if f.default is not _NO_DEFAULT
                                         else f.default_factory())
        text = m.get("help", "").replace("%", "%%")
        if m.get("negate"):
            action = parser.add_argument(m["negate"], dest=f.name, action="store_const",
                                         const=False, default=argparse.SUPPRESS,
                                         help=f"turn off: {text}")
            action.field = f"{cls.__name__}.{f.name}"
            continue
        allowed = _types(hints[f.name])
        said = required or "default" in text          # the help already says what happens
        kw = dict(dest=f.name, help=text if said else f"{text} (default: {default})")
        if required:
            kw["required"] = True
        else:
            kw["default"] = argparse.SUPPRESS
        if m.get("parse"):
            kw["type"] = m["parse"]
        elif bool in allowed:
            kw.update(nargs="?", const=True, type=parse_bool, metavar="true|false")
        elif list in allowed:
            if m.get("repeat"):
                kw["action"] = "append"
            else:
                kw["nargs"] = "+"
        else:
            kw["type"] = next(t for t in (int, float, str) if t in allowed)
            if type(None) in allowed:                     # --target-ratio none
                kw["type"] = _or_none(kw["type"])
        if m.get("choices"):
            kw["choices"] = m["choices"]
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
        action = parser.add_argument("--" + f.name.replace("_", "-"), *m.get("flags", ()), **kw)
        action.field = f"{cls.__name__}.{f.name}"       # where the flag comes from (tests)


def _or_none(parse):
    def parse_or_none(text: str):
        return None if text.strip().lower() in ("none", "null") else parse(text)
    parse_or_none.__name__ = parse.__name__        # argparse names the type in its errors
    return parse_or_none


def given_flags(args: argparse.Namespace, cls: type[Config]) -> dict:
    """The fields of `cls` whose flags were given on the command line."""
    return {k: getattr(args, k) for k in cls.field_names() if hasattr(args, k)}


# ----------------------------------------------------------------------------------------
# Fields the scoring steps share (predict, explain, oof, evaluate; train's device and
# progress): their default, choices and check are spelled here once, each config says in its
# help what the field means for it
# ----------------------------------------------------------------------------------------

AGGREGATIONS = ("mean", "max")        # views -> breast
DEVICES = ("auto", "cpu", "cuda")


def agg_setting(help: str = "views -> breast score"):
    return setting("mean", help, choices=AGGREGATIONS)


def tta_setting(help: str = "average with the horizontal flip", default: bool | None = False):
    return setting(default, help)


def device_setting(help: str = "auto | cpu | cuda"):
    return setting("auto", help, choices=DEVICES)


def backend_setting(help: str = "decoder: auto, imagecodecs, dicomsdl, pydicom, nvimgcodec, "
                    "dali"):
    return setting("auto", help)


def progress_setting(help: str = "progress bar"):
    return setting(True, help, negate="--quiet")
