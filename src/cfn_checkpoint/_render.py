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
import errno
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, BinaryIO

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
    """``512 B``, ``1.2 KiB``, ``3.4 MiB`` ... (1048575 is ``1.0 MiB``, not ``1024.0 KiB``)."""
    if abs(n) < 1024:
        return f"{n} B"
    size = float(n)
    for unit in _SIZE_UNITS[1:]:
        size /= 1024
        if abs(round(size, 1)) < 1024 or unit == _SIZE_UNITS[-1]:
            return f"{size:.1f} {unit}"
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
    """``0.934`` -> ``93%``; never ``100%`` below 1 (``0.9996`` -> ``99.9%``)."""
    value = ratio * 100
    if ratio < 1 and round(value) >= 100:
        return f"{min(math.floor(value * 10) / 10, 99.9):.1f}%"
    return f"{value:.0f}%"


def dedup_percent(stored: int, raw: int) -> str:
    """The share of ``raw`` bytes not stored, for tables: ``100%`` only when nothing was
    stored, ``99.9%`` at most otherwise, ``0%`` when everything (or more) was."""
    if raw <= 0 or stored >= raw:
        return "0%"
    if stored <= 0:
        return "100%"
    return percent(min((raw - stored) / raw, math.nextafter(1.0, 0.0)))


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


#: Strings longer than this are shown from their first bytes, not parsed as JSON first.
PRETTY_LIMIT = 1 << 20


def truncation_note(total: int) -> str:
    """The line that ends a value cut short: ``… (truncated, N bytes in all)``."""
    return f"\u2026 (truncated, {total} bytes in all)"


def utf8_prefix(raw: bytes) -> str | None:
    """``raw`` (the start of something longer) as text, dropping a character cut in
    two at its end; ``None`` when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(raw) - 3 or exc.reason != "unexpected end of data":
            return None
        return raw[: exc.start].decode("utf-8", errors="strict")


def cut_utf8(text: str, max_bytes: int) -> str:
    """The longest start of ``text`` that is at most ``max_bytes`` UTF-8 bytes."""
    raw = text.encode("utf-8", errors="surrogatepass")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", errors="ignore")


def cap_lines(
    lines: Iterable[str], max_bytes: int | None, total: int, *, cut: bool = False
) -> tuple[list[str], bool]:
    """``lines`` up to ``max_bytes`` bytes of text (UTF-8, with a newline between two
    lines counting one; the line that crosses the limit is cut), then
    :func:`truncation_note` of ``total`` bytes. ``cut``: the lines are already the start
    of something longer. Returns the lines and whether anything was left out.
    ``max_bytes`` ``None``: no limit."""
    out: list[str] = []
    if max_bytes is None:
        out.extend(lines)
        return out, False
    budget = max_bytes
    truncated = cut
    for line in lines:
        size = len(line.encode("utf-8", errors="surrogatepass")) + (1 if out else 0)
        if size <= budget:
            out.append(line)
            budget -= size
            continue
        if out:
            budget -= 1  # the newline before the cut line
        if budget > 0:
            out.append(cut_utf8(line, budget))
        truncated = True
        break
    if truncated:
        out.append(truncation_note(total))
    return out, truncated


#: Longer text is written in pieces of this many characters (see :func:`echo_long`).
_PIECE = 1 << 16


def echo_long(text: str, *, err: bool = False) -> None:
    """``click.echo(text)``, in pieces when ``text`` is long, then the newline on its own.

    One big write into a pipe whose reader has gone can come back cut short without an
    error, and the rest of the text would be lost unnoticed; every write after it fails
    with ``BrokenPipeError``, which the command turns into a quiet exit.
    """
    if len(text) <= _PIECE:
        click.echo(text, err=err)
        return
    for start in range(0, len(text), _PIECE):
        click.echo(text[start : start + _PIECE], nl=False, err=err)
    click.echo("", err=err)


def write_binary(source: BinaryIO, target: BinaryIO) -> None:
    """Copy ``source`` to ``target`` (stdout) in pieces, raising ``BrokenPipeError`` when a
    piece is not written whole (the reader went away)."""
    while piece := source.read(_PIECE):
        written = target.write(piece)
        if written is not None and written < len(piece):
            raise BrokenPipeError(errno.EPIPE, "stdout closed before everything was written")
    target.flush()


class Output:
    """Where a command writes: stdout for results, stderr for notes, progress and errors."""

    def __init__(self, *, json_mode: bool = False, verbose: bool = False) -> None:
        self.json_mode = json_mode
        self.verbose = verbose
        self.console = Console(markup=False, highlight=False, emoji=False, width=_TABLE_WIDTH)
        self.err_console = Console(stderr=True, markup=False, highlight=False, emoji=False)

    def json(self, data: Any, *, err: bool = False) -> None:
        """Print ``data`` as JSON (ASCII only, so any terminal or pipe can carry it); on
        stderr with ``err`` (when stdout carries something else)."""
        echo_long(json.dumps(data, indent=2, ensure_ascii=True), err=err)

    def json_line(self, data: Any) -> None:
        """Print ``data`` as one line of JSON (for streams such as ``watch``)."""
        echo_long(json.dumps(data, ensure_ascii=True, separators=(",", ":")))

    def line(self, text: str = "") -> None:
        """One line of human-readable output."""
        echo_long(text)

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
        # One write: a reader that stops after the first line (``| head -1``) has then
        # been given the whole table, rather than racing the writes of its other lines.
        lines = [line.rstrip() for line in captured.get().splitlines()]
        if lines:
            click.echo("\n".join(lines), color=self.console.is_terminal)

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
            if len(text) > _PIECE:
                echo_long(text)
            else:
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
