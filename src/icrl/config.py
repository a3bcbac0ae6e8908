"""Settings declared once: each field of a config dataclass carries its range and help text.

    steps: int = param(3000, low=1, help="optimizer steps")

`check(cfg)` validates a config against those declarations (the one validation of each config),
and the command line builds its options from them (`options`), so an option's name, default and
range cannot drift from its field's. An option is named after its field (`batch_size` is
`--batch-size`) unless the field declares another `flag`; the fields of a nested config (e.g.
`ModelSpec.transformer`) are options of their own. Fields of other types (dicts, tuples) are not
options and are not checked here.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import numbers
import types
import typing
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .errors import UserError

MAX_INT = 2 ** 63  # integers end up in NumPy and torch (seeds, sizes), which stop at int64
KINDS = (bool, int, float, str)


def param(default=dataclasses.MISSING, *, low=None, high=None, open_low=False, open_high=False,
          help="", choices=None, flag=None):
    """A dataclass field with its allowed range ([low, high]; `open_low`/`open_high` exclude the
    bound), allowed `choices` (strings), help text and, if not the field's name, its option name.
    A dataclass type as `default` means a fresh instance of it (a nested config)."""
    meta = {"low": low, "high": high, "open_low": open_low, "open_high": open_high,
            "help": help, "choices": choices, "flag": flag}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Option:
    path: tuple[str, ...]   # field names from the root config, e.g. ("transformer", "n_layer")
    flag: str               # as typed on the command line, e.g. "--layers"
    kind: type              # bool, int, float or str
    optional: bool          # None is allowed
    meta: dict
    default: object


def options(cls) -> list[Option]:
    """The options of config class `cls` (nested configs included), in field order."""
    found = _options(cls, (), cls())
    flags = [o.flag for o in found]
    twice = sorted({f for f in flags if flags.count(f) > 1})
    if twice:  # a programming error: declare `flag=` on one of them
        raise TypeError(f"{cls.__name__}: options {', '.join(twice)} are declared twice")
    return found


def _options(cls, prefix: tuple, defaults) -> list[Option]:
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        kind, optional = _kind(hints[f.name])
        if dataclasses.is_dataclass(kind):
            found += _options(kind, prefix + (f.name,), getattr(defaults, f.name))
        elif kind in KINDS:
            flag = "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
            found.append(Option(prefix + (f.name,), flag, kind, optional, dict(f.metadata),
                                getattr(defaults, f.name)))
    return found


def _kind(hint) -> tuple[object, bool]:
    """(the type, whether None is allowed) of an annotation such as `int | None`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else None), True
    return hint, False


def check(cfg) -> None:
    """UserError, in one line naming the option, unless every field of `cfg` has its declared type
    and lies in its declared range. Integers must be real integers (not bools) below 2**63,
    numbers finite."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config dataclass instance, got {cfg!r}")
    for opt in options(type(cfg)):
        value = cfg
        for i, name in enumerate(opt.path):
            value = getattr(value, name)
            if i < len(opt.path) - 1 and not dataclasses.is_dataclass(value):
                raise TypeError(f"{'.'.join(opt.path[:i + 1])} must be a config dataclass, "
                                f"got {value!r}")
        if not (value is None and opt.optional):
            check_value(opt.flag, value, opt.kind, **{k: opt.meta.get(k) for k in RANGE_KEYS})


RANGE_KEYS = ("low", "high", "open_low", "open_high", "choices")


def check_value(name: str, value, kind: type, low=None, high=None, open_low=False,
                open_high=False, choices=None) -> None:
    """UserError `NAME: ...` unless `value` is a `kind` (bool, int, float, str) within range."""
    def fail(why):
        raise UserError(f"{name}: {why}, got {value!r}")

    if kind is bool:
        if not isinstance(value, bool):
            fail("expected true or false")
        return
    if kind is str:
        if not isinstance(value, str):
            fail("expected a string")
        if choices is not None and value not in choices:
            fail(f"must be one of {', '.join(choices)}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail("expected an integer" if kind is int else "expected a number")
    if kind is int and not isinstance(value, numbers.Integral):
        fail("expected an integer")
    if not math.isfinite(value):
        fail("must be a finite number")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        fail("must be " + _bounds(low, high, open_low, open_high))
    if kind is int and not -MAX_INT <= value < MAX_INT:
        fail("must be below 2**63" if value > 0 else "must be at least -2**63")


def _bounds(low, high, open_low, open_high) -> str:
    lower = None if low is None else f"{'>' if open_low else '>='} {low}"
    upper = None if high is None else f"{'<' if open_high else '<='} {high}"
    if lower and upper:
        return f"between {low} and {high}" if not (open_low or open_high) \
            else f"{lower} and {upper}"
    return lower or upper


# -- the command line: options from the fields, configs from the options

def parse_int(text: str) -> int:
    """An integer, also written like 1e6; the range is checked with the config."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        number = None
    if number is None or not number.is_finite() or number != number.to_integral_value():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if number.adjusted() > 100:  # int() of 1e999999999 would take forever
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {text}")
    return int(number)


def parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def path_option(text: str) -> Path:
    if not text:  # Path("") would silently mean the current directory
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return Path(text)


def add_options(parser, cls):
    """An argparse option per field of config class `cls`, with the field's default."""
    parse = {int: parse_int, float: parse_float, str: str}
    for opt in options(cls):
        kw = {"dest": ".".join(opt.path), "default": opt.default,
              "help": opt.meta.get("help") or "default: %(default)s"}
        if opt.kind is bool:
            parser.add_argument(opt.flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(opt.flag, type=parse[opt.kind], metavar=opt.kind.__name__.upper(),
                                **kw)


def from_options(cls, args, prefix=(), **given):
    """Config `cls` from the parsed options (fields without an option keep their defaults)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = ".".join(prefix + (f.name,))
        if hasattr(args, key):
            given[f.name] = getattr(args, key)
        elif dataclasses.is_dataclass(hints[f.name]):
            given[f.name] = from_options(hints[f.name], args, prefix + (f.name,))
    return cls(**given)
