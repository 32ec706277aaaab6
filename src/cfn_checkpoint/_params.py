"""Command-line value types: durations, ``--meta`` pairs and recovery tiers.

Each is a :class:`click.ParamType`, so a bad value is a usage error (exit 2) that
names the option, raised before any store is opened.
"""

from __future__ import annotations

import json
import math
import re
from datetime import timedelta
from typing import Any

import click

#: Seconds in each duration unit.
_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86_400,
    "w": 604_800,
}
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h|d|w)")
DURATION_HINT = "use a number and a unit: 300ms, 0.5s, 30s, 5m, 2h, 7d, 1w, or 1h30m"
#: The longest duration any option takes: 100 years (of 365 days). Longer ones would
#: overflow date arithmetic, and mean "never" anyway.
MAX_DURATION = timedelta(days=36_500)


class DurationTooLong(ValueError):
    """A well-formed duration beyond :data:`MAX_DURATION`."""


def parse_duration(text: str) -> timedelta:
    """``300ms``, ``0.5s``, ``30s``, ``5m``, ``2h``, ``7d``, ``1w`` or a sum like ``1h30m``
    (spaces allowed: ``1h 30m``).

    Raises ``ValueError`` for anything else, and for a duration longer than
    :data:`MAX_DURATION`.
    """
    compact = text.strip().lower().replace(" ", "")
    if not compact:
        raise ValueError("empty duration")
    seconds = 0.0
    position = 0
    for match in _PART.finditer(compact):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(compact):
        raise ValueError(f"{text!r} is not a duration")
    if not seconds <= MAX_DURATION.total_seconds():  # also catches inf and nan
        raise DurationTooLong(f"{text!r} is longer than {MAX_DURATION.days}d")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """A duration the way :func:`parse_duration` reads it, units apart as in ages
    (``5m``, ``300ms``, ``1h 30m``, ``5214w 2d``)."""
    ms = round(value.total_seconds() * 1000)
    if ms == 0:
        return "0s"
    parts = []
    for unit in ("w", "d", "h", "m", "s", "ms"):
        size = round(_UNITS[unit] * 1000)
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts)


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic in click 8.3+
    """A duration option, at most :data:`MAX_DURATION`; ``minimum`` refuses shorter ones."""

    name = "duration"

    def __init__(self, *, minimum: timedelta | None = None) -> None:
        self.minimum = minimum

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            result = parse_duration(str(value))
        except DurationTooLong:
            longest = f"{MAX_DURATION.days}d (100 years)"
            self.fail(f"{value!r} is too long: at most {longest}", param, ctx)
        except ValueError:
            self.fail(f"{value!r} is not a duration ({DURATION_HINT})", param, ctx)
        if self.minimum is not None and result < self.minimum:
            shortest = format_duration(self.minimum)
            self.fail(f"{value!r} is too short: at least {shortest}", param, ctx)
        return result


class MetaPair(click.ParamType):  # type: ignore[type-arg]
    """``KEY=VALUE`` (a string) or ``KEY:=JSON`` (any JSON value) for checkpoint metadata.

    Keys and strings must be UTF-8 text (an argument of other bytes arrives with lone
    surrogates, which no export or JSON output could carry), and JSON numbers finite.
    """

    name = "meta"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "KEY=VALUE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, Any]:
        if isinstance(value, tuple):
            return value
        text = str(value)
        shown = _shown(text)
        key, sep, rest = text.partition("=")
        if not sep:
            self.fail(f"{shown} is not KEY=VALUE (or KEY:=JSON)", param, ctx)
        as_json = key.endswith(":")
        key = key.removesuffix(":").strip()
        if not key:
            self.fail(f"{shown} has an empty key", param, ctx)
        if not _is_text(key):
            self.fail(f"{shown}: the key is not UTF-8 text", param, ctx)
        if not as_json:
            if not _is_text(rest):
                self.fail(f"{shown}: the value is not UTF-8 text", param, ctx)
            return key, rest
        try:
            parsed = json.loads(rest, parse_constant=_no_constant)
        except ValueError:
            self.fail(f"{shown}: {_shown(rest)} is not valid JSON", param, ctx)
        problem = _json_problem(parsed)
        if problem:
            self.fail(f"{shown}: {problem}", param, ctx)
        return key, parsed


def _shown(text: str) -> str:
    """An argument quoted for a message: ``'text'``, or ``b'...'`` when it is not UTF-8
    (the bytes the shell passed)."""
    if _is_text(text):
        return repr(text)
    return repr(text.encode("utf-8", "surrogateescape" if _escapable(text) else "backslashreplace"))


def _escapable(text: str) -> bool:
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def _is_text(text: str) -> bool:
    """True when ``text`` encodes as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_problem(value: Any) -> str | None:
    """Why a parsed ``--meta`` JSON value cannot be stored, or ``None``."""
    if isinstance(value, str):
        return None if _is_text(value) else "a string in the JSON value is not UTF-8 text"
    if isinstance(value, float) and not math.isfinite(value):
        return "a number in the JSON value is not finite"
    if isinstance(value, list):
        return next((p for v in value if (p := _json_problem(v))), None)
    if isinstance(value, dict):
        return next((p for kv in value.items() for x in kv if (p := _json_problem(x))), None)
    return None


def meta_dict(pairs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """The metadata mapping of repeated ``--meta`` options; a repeated key is a usage error."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise click.BadParameter(f"key {key!r} given twice", param_hint="'--meta'")
        out[key] = value
    return out


#: The tiers ``recover --tiers`` accepts.
TIERS = ("runtime", "durable")


class Tiers(click.ParamType):  # type: ignore[type-arg]
    """A comma-separated subset of ``runtime,durable``."""

    name = "tiers"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "runtime,durable"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> frozenset[str]:
        if isinstance(value, frozenset):
            return value
        names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
        unknown = [n for n in names if n not in TIERS]
        if unknown or not names:
            self.fail(f"{value!r}: expected runtime, durable or runtime,durable", param, ctx)
        return frozenset(names)
