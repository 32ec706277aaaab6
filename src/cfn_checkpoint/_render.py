"""Output of the command: tables and text for people, JSON for programs, progress on a terminal.

Everything that comes from a task (key names, values, metadata) is made safe before
it reaches a terminal: non-UTF-8 bytes are shown as a ``b'...'`` literal and control
characters are escaped, so a value can never move the cursor or recolour the screen.
Rich markup and emoji codes are off for the same reason: ``[bold]`` in a key name is
printed as it is.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

#: Width tables are laid out in: never cut, so that ids can be copied whole (a terminal
#: narrower than a table wraps its lines instead).
_TABLE_WIDTH = 100_000
_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


# -- numbers, times and bytes ----------------------------------------------------------------


def human_size(n: int) -> str:
    """``512 B``, ``1.2 KiB``, ``3.4 MiB`` ..."""
    size = float(n)
    for unit in _SIZE_UNITS:
        if abs(size) < 1024 or unit == _SIZE_UNITS[-1]:
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """Two units at most: ``12s``, ``4m 12s``, ``3h 5m``, ``2d 4h``, ``3w 2d``."""
    left = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        n, left = divmod(left, size)
        if n or (unit == "s" and not parts):
            parts.append(f"{n}{unit}")
        if len(parts) == 2:
            break
    return " ".join(parts)


def seconds_since(moment: datetime, now: datetime | None = None) -> float:
    """Seconds from ``moment`` to now (or ``now``)."""
    return ((now or datetime.now(UTC)) - moment).total_seconds()


def count(n: int, noun: str) -> str:
    """``1 key``, ``2 keys``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def percent(ratio: float) -> str:
    """``0.934`` -> ``93%``."""
    return f"{ratio * 100:.0f}%"


def printable(text: str) -> str:
    """``text`` with control and other non-printable characters escaped (newlines kept)."""
    if all(ch.isprintable() or ch in "\n\t" for ch in text):
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch in "\n\t":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def show_bytes(raw: bytes) -> str:
    """Bytes for a terminal: the text if it is UTF-8 (escaped where needed), else a literal."""
    try:
        return printable(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)


def one_line(text: str) -> str:
    """``text`` on one line: newlines and tabs escaped."""
    return printable(text).replace("\n", "\\n").replace("\t", "\\t")


def bytes_json(raw: bytes) -> str | dict[str, str]:
    """Bytes for JSON, exactly: the string if UTF-8, else ``{"base64": ...}``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(raw).decode("ascii")}


def plain_json(value: Any) -> Any:
    """A durable-row value (or anything nested) with bytes made JSON-safe."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes_json(bytes(value))
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN or infinity: "nan", "inf", "-inf"
    return value


def pretty_text(raw: bytes) -> str:
    """A string value for reading: indented JSON when it is a JSON object or array, else
    :func:`show_bytes`."""
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return show_bytes(raw)
    if not isinstance(parsed, dict | list):
        return show_bytes(raw)  # "1e5" stays 1e5, not 100000.0
    return printable(json.dumps(parsed, indent=2, sort_keys=True, ensure_ascii=False))


# -- the output channel ------------------------------------------------------------------------


class Output:
    """Where a command writes: stdout for results, stderr for notes, progress and errors."""

    def __init__(self, *, json_mode: bool = False, verbose: bool = False) -> None:
        self.json_mode = json_mode
        self.verbose = verbose
        self.console = Console(markup=False, highlight=False, emoji=False, width=_TABLE_WIDTH)
        self.err_console = Console(stderr=True, markup=False, highlight=False, emoji=False)

    def json(self, data: Any) -> None:
        """Print ``data`` as JSON (ASCII only, so any terminal or pipe can carry it)."""
        click.echo(json.dumps(data, indent=2, ensure_ascii=True))

    def json_line(self, data: Any) -> None:
        """Print ``data`` as one line of JSON (for streams such as ``watch``)."""
        click.echo(json.dumps(data, ensure_ascii=True, separators=(",", ":")))

    def line(self, text: str = "") -> None:
        """One line of human-readable output."""
        click.echo(text)

    def note(self, text: str) -> None:
        """A remark on stderr, for people: it never mixes with JSON on stdout."""
        click.echo(text, err=True)

    def info(self, text: str) -> None:
        """A remark on stderr shown only with ``-v``."""
        if self.verbose:
            click.echo(text, err=True)

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[str]],
        *,
        right: Sequence[str] = (),
        header: bool = True,
    ) -> None:
        """A table without borders, one row per line, never wrapped off a terminal."""
        table = Table(
            box=None, pad_edge=False, show_edge=False, show_header=header, header_style="bold"
        )
        for name in columns:
            table.add_column(name, justify="right" if name in right else "left", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        with self.console.capture() as captured:
            self.console.print(table)
        for text in captured.get().splitlines():
            click.echo(text.rstrip(), color=self.console.is_terminal)

    def diff_lines(self, lines: Sequence[str]) -> None:
        """Unified-diff lines, coloured on a terminal."""
        for text in lines:
            colour = None
            if text.startswith(("+++", "---")):
                colour = "bright_white"
            elif text.startswith("+"):
                colour = "green"
            elif text.startswith("-"):
                colour = "red"
            elif text.startswith("@@"):
                colour = "cyan"
            click.secho(text, fg=colour)

    @contextlib.contextmanager
    def busy(self, message: str) -> Iterator[None]:
        """A spinner with ``message`` on a terminal (stderr); nothing otherwise."""
        if not self.err_console.is_terminal:
            yield
            return
        with self.err_console.status(message):
            yield

    @contextlib.contextmanager
    def progress(self, message: str, total: int) -> Iterator[Progress | None]:
        """A progress bar on a terminal (stderr), else ``None``; move it on with :func:`advance`."""
        if not self.err_console.is_terminal:
            yield None
            return
        bar = Progress(
            TextColumn(message),
            BarColumn(),
            MofNCompleteColumn(),
            console=self.err_console,
            transient=True,
        )
        with bar:
            bar.add_task(message, total=total)
            yield bar


def advance(bar: Progress | None) -> None:
    """Advance a bar from :meth:`Output.progress` by one (no-op off a terminal)."""
    if bar is not None:
        bar.advance(bar.task_ids[0])
