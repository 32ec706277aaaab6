"""Command-line value types: durations, ``--meta`` pairs and recovery tiers.

Each is a :class:`click.ParamType`, so a bad value is a usage error (exit 2) that
names the option, raised before any store is opened.
"""

from __future__ import annotations

import json
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


def parse_duration(text: str) -> timedelta:
    """``300ms``, ``0.5s``, ``30s``, ``5m``, ``2h``, ``7d``, ``1w`` or a sum like ``1h30m``.

    Raises ``ValueError`` for anything else.
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
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """A duration the way :func:`parse_duration` reads it (``5m``, ``300ms``, ``1h30m``)."""
    ms = round(value.total_seconds() * 1000)
    if ms == 0:
        return "0s"
    parts = []
    for unit in ("w", "d", "h", "m", "s", "ms"):
        size = round(_UNITS[unit] * 1000)
        count, ms = divmod(ms, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic in click 8.3+
    """A duration option; ``positive`` refuses zero."""

    name = "duration"

    def __init__(self, *, positive: bool = False) -> None:
        self.positive = positive

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            result = parse_duration(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a duration ({DURATION_HINT})", param, ctx)
        if self.positive and result <= timedelta(0):
            self.fail(f"{value!r} must be longer than zero", param, ctx)
        return result


class MetaPair(click.ParamType):  # type: ignore[type-arg]
    """``KEY=VALUE`` (a string) or ``KEY:=JSON`` (any JSON value) for checkpoint metadata."""

    name = "meta"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "KEY=VALUE"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, Any]:
        if isinstance(value, tuple):
            return value
        text = str(value)
        key, sep, rest = text.partition("=")
        if not sep:
            self.fail(f"{text!r} is not KEY=VALUE (or KEY:=JSON)", param, ctx)
        as_json = key.endswith(":")
        key = key.removesuffix(":").strip()
        if not key:
            self.fail(f"{text!r} has an empty key", param, ctx)
        if not as_json:
            return key, rest
        try:
            return key, json.loads(rest)
        except ValueError:
            self.fail(f"{text!r}: {rest!r} is not valid JSON", param, ctx)


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
