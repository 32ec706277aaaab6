"""The ``cfn-checkpoint`` command: inspect, diff, recover, export and watch checkpoints.

Library errors propagate up to here and nowhere else are they translated: a
:class:`~cfn_checkpoint.errors.CheckpointError` becomes one ``error: ...`` line on stderr
and an exit code (:data:`EXIT_CODES`): 1 failure, 2 usage or validation, 3 not found,
4 corrupt. Click's own usage errors are shortened to one such line as well (exit 2);
``-v`` adds the traceback.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from ._cli_docs import render_docs
from ._params import Duration, MetaPair, Tiers, format_duration, meta_dict
from ._render import (
    Output,
    advance,
    count,
    human_size,
    one_line,
    show_bytes,
    write_binary,
)
from ._views import (
    CHECKPOINT_COLUMNS,
    CHECKPOINT_RIGHT,
    checkpoint_fields,
    checkpoint_json,
    checkpoint_row,
    dedup_text,
    diff_json,
    entry_json,
    entry_row,
    entry_type,
    find_entry,
    key_change_row,
    key_value_diff,
    namespace_counts,
    plan_json,
    recovery_json,
    recovery_line,
    row_change_row,
    row_value_diff,
    task_json,
    task_row,
    value_view,
    verify_json,
)
from ._watch import Watcher, WatchLog, stop_on_signals
from .config import durable_url_from_env, redis_url_from_env
from .contents import CheckpointContents
from .demo import format_report, report_json, run_demo
from .diff import Change, StateDiff
from .durable.sql import CleanupResult, redact_durable_url
from .durable.sqlite import sqlite_path_from_url
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ErrorCode,
    StoreUnavailableError,
    ValidationError,
)
from .layout import KeyLayout
from .manager import CheckpointManager
from .model import (
    USABLE_STATUSES,
    CheckpointConfig,
    CheckpointMetadata,
    CheckpointStatus,
    CheckpointTrigger,
    RuntimeEntry,
)
from .runtime.connection import is_cluster_url
from .runtime.redis_runtime import redact_url
from .transfer import read_export

#: Exit code of each error code; anything not listed exits with 1 (failure).
EXIT_CODES: dict[ErrorCode, int] = {
    ErrorCode.VALIDATION: 2,
    ErrorCode.NOT_FOUND: 3,
    ErrorCode.CORRUPT: 4,
}
#: Exit code when stdout's reader went away before everything was written (128 + SIGPIPE).
EXIT_STDOUT_CLOSED = 141
#: Every exit code of the command and what it means (documented in ``docs/cli.md``).
EXIT_CODE_MEANINGS: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (
        1,
        "failure: a store unreachable or unusable (Redis or PostgreSQL down or refusing the "
        "login, SQLite file missing, unwritable or not a database), a lock timeout, a failed "
        "restore, an unexpected error",
    ),
    (2, "usage or validation: a bad option, argument, URL, duration, task id or file"),
    (3, "not found: an unknown task, checkpoint or key"),
    (4, "corrupt: a stored checkpoint or an export file does not match its hashes"),
    (
        141,
        "stdout closed early (its reader, such as `head`, exited): the output was cut short, "
        "nothing else went wrong; 128 + SIGPIPE, as shells report it",
    ),
)
#: Bytes of each value ``show --value``, ``diff`` and ``recover --dry-run`` print in text
#: unless ``--max-bytes`` says otherwise.
DEFAULT_MAX_BYTES = 4096
_NO_ARGS_HELP: tuple[type[BaseException], ...] = tuple(
    getattr(click.exceptions, name)
    for name in ("NoArgsIsHelpError",)
    if hasattr(click.exceptions, name)
)


def exit_code_for(error: CheckpointError) -> int:
    """The exit code a :class:`CheckpointError` ends the command with."""
    return EXIT_CODES.get(error.code, 1)


def fail(message: str, exit_code: int = 1) -> NoReturn:
    """End the command: ``error: <message>`` as one line on stderr (control characters
    and undecodable bytes escaped), then ``exit_code``."""
    click.echo(f"error: {one_line(' '.join(message.split()))}", err=True)
    raise click.exceptions.Exit(exit_code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that nothing more (not even the flush at exit)
    fails on a pipe whose reader has gone."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (a test runner's stdout)
        pass
    finally:
        os.close(devnull)


def _stdout_closed() -> NoReturn:
    """End the command quietly after stdout's reader went away (``... | head -1``)."""
    _silence_stdout()
    raise click.exceptions.Exit(EXIT_STDOUT_CLOSED)


def _usage_fail(exc: click.ClickException) -> NoReturn:
    ctx = exc.ctx if isinstance(exc, click.UsageError) else None
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    fail(exc.format_message() + hint, exc.exit_code)


def _print_traceback(ctx: click.Context, exc: BaseException) -> None:
    settings = ctx.obj
    if isinstance(settings, Settings) and settings.out.verbose:
        click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)


class _Group(click.Group):
    """A group that turns every error into one line and an exit code, at the boundary."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _NO_ARGS_HELP:
            raise
        except click.ClickException as exc:
            _usage_fail(exc)
        except BrokenPipeError:  # --help or --version into a closed pipe
            _stdout_closed()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _NO_ARGS_HELP:
            raise
        except click.ClickException as exc:
            _print_traceback(ctx, exc)
            _usage_fail(exc)
        except (click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            _stdout_closed()
        except CheckpointError as exc:
            _print_traceback(ctx, exc)
            fail(exc.message or exc.code.value, exit_code_for(exc))
        except Exception as exc:
            _print_traceback(ctx, exc)
            hint = "" if ctx.obj and ctx.obj.out.verbose else " (run with -v for the traceback)"
            fail(f"unexpected {type(exc).__name__}: {exc}{hint}", 1)


def _set_output_flag(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """``--json`` or ``-v`` given after the command: the same as before it."""
    settings = ctx.find_object(Settings)
    if value and settings is not None:
        if param.name == "json_mode":
            settings.out.json_mode = True
        else:
            settings.out.verbose = True


class _Command(click.Command):
    """A command that also takes the global ``--json`` and ``-v`` after its name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(
                ["--json", "json_mode"],
                is_flag=True,
                expose_value=False,
                callback=_set_output_flag,
                help="Print JSON instead of tables (as the global --json).",
            ),
            click.Option(
                ["-v", "--verbose"],
                is_flag=True,
                expose_value=False,
                callback=_set_output_flag,
                help="Say where the stores are; tracebacks (as the global -v).",
            ),
        ]


_Group.command_class = _Command


@dataclass(frozen=True, slots=True)
class Settings:
    """Options shared by every command (``ctx.obj``)."""

    #: ``--redis-url`` / ``CFN_REDIS_URL``; ``None``: ``CFN_REDIS_HOST``/``PORT``, else embedded.
    redis_url: str | None
    #: ``--durable-url`` / ``CFN_DURABLE_URL``; ``None``: the library's default.
    durable_url: str | None
    #: ``--key-prefix`` / ``CFN_KEY_PREFIX``: put in front of every runtime key.
    key_prefix: str = ""
    #: ``--key-layout`` / ``CFN_KEY_LAYOUT``: ``reference``, ``cluster`` or ``auto``.
    key_layout: str = "auto"
    #: Where results, notes and progress go (``--json``, ``-v``).
    out: Output = field(default_factory=Output)

    @property
    def json(self) -> bool:
        """True with ``--json``."""
        return self.out.json_mode


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="--json and -v may also follow the command's name. Exit codes: 0 success, "
    "1 failure (store unreachable, lock timeout, restore failed), 2 usage or validation "
    "error, 3 not found, 4 corrupt, 141 stdout closed early (a pipe into head).",
)
@click.version_option(__version__, "--version", prog_name="cfn-checkpoint")
@click.option(
    "--redis-url",
    envvar="CFN_REDIS_URL",
    show_envvar=True,
    metavar="URL",
    help="Redis of the runtime tier (redis://, rediss://, unix://), or a Redis Cluster "
    "by one of its nodes (redis+cluster://host:port, rediss+cluster://). "
    "Default: CFN_REDIS_HOST/CFN_REDIS_PORT, else an embedded redis-server.",
)
@click.option(
    "--durable-url",
    envvar="CFN_DURABLE_URL",
    show_envvar=True,
    metavar="URL",
    help="Durable tier: sqlite:///path/to/file.db, or "
    "postgresql://user:password@host:port/dbname (a schema with "
    "?options=-csearch_path%3Dschema). Default: sqlite:///cfn-checkpoint.db.",
)
@click.option(
    "--key-prefix",
    envvar="CFN_KEY_PREFIX",
    show_envvar=True,
    default="",
    metavar="PREFIX",
    help="Put in front of every runtime key (one tenant's keys, e.g. 'tenant-a:').",
)
@click.option(
    "--key-layout",
    envvar="CFN_KEY_LAYOUT",
    show_envvar=True,
    type=click.Choice(["auto", "reference", "cluster"]),
    default="auto",
    metavar="LAYOUT",
    help="How task keys are named: reference (agent:<task>:<id>) or cluster "
    "(agent:{<task>}:<id>: one Redis Cluster slot per task, read atomically). "
    "Default auto: cluster for a redis+cluster:// URL, else reference.",
)
@click.option("--json", "json_mode", is_flag=True, help="Print JSON instead of tables.")
@click.option("-v", "--verbose", is_flag=True, help="Say where the stores are; tracebacks.")
@click.pass_context
def cli(
    ctx: click.Context,
    redis_url: str | None,
    durable_url: str | None,
    key_prefix: str,
    key_layout: str,
    json_mode: bool,
    verbose: bool,
) -> None:
    """Checkpoint and recover multi-agent task state across Redis and SQLite or PostgreSQL.

    A checkpoint is a consistent snapshot of one task: its runtime keys in Redis
    (agents, signals, queues, locks) and its durable rows in SQLite or PostgreSQL. Sizes
    and ages are rounded in tables and exact with --json. Progress is shown on a terminal only.
    """
    ctx.obj = Settings(
        redis_url=redis_url or None,
        durable_url=durable_url or None,
        key_prefix=key_prefix,
        key_layout=key_layout,
        out=Output(json_mode=json_mode, verbose=verbose),
    )


# -- opening the stores ----------------------------------------------------------------------


def _missing_store_file(durable_url: str | None) -> str | None:
    """The path of the SQLite file the URL names if that file does not exist yet."""
    url = durable_url or durable_url_from_env()
    if url.split(":", 1)[0].lower() != "sqlite":
        return None
    path = sqlite_path_from_url(url)
    return None if os.path.exists(path) else path


def _require_store_file(durable_url: str | None) -> None:
    """Refuse a SQLite file that does not exist, rather than create an empty one: a
    mistyped path must not look like a store without checkpoints."""
    missing = _missing_store_file(durable_url)
    if missing is not None:
        raise StoreUnavailableError(
            f"no durable store at {missing}: check --durable-url / CFN_DURABLE_URL"
        )


def open_manager(
    settings: Settings,
    *,
    runtime: bool = False,
    create: bool = False,
    config: CheckpointConfig | None = None,
) -> CheckpointManager:
    """Open both tiers for the current command; closed when the command ends.

    ``runtime``: the command reads or writes task keys (warn when that Redis is a
    throwaway embedded one). ``create``: the command may create the SQLite file.
    """
    if not create:
        _require_store_file(settings.durable_url)
    embedded = settings.redis_url is None and redis_url_from_env() is None
    if runtime and embedded:
        settings.out.note(
            "warning: no --redis-url or CFN_REDIS_URL: using a private, empty redis-server "
            "that stops when this command ends"
        )
    # Commands on stored checkpoints alone connect Redis only if they come to need it,
    # so they keep working while Redis is down (the incident this tool is for).
    manager = CheckpointManager.open(
        settings.redis_url,
        settings.durable_url,
        layout=_layout(settings),
        config=config,
        lazy_runtime=not runtime,
    )
    click.get_current_context().with_resource(manager)
    settings.out.info(_where(settings, manager, runtime))
    return manager


def _layout(settings: Settings) -> KeyLayout:
    """The key layout ``--key-layout`` names (``auto``: cluster for a cluster URL)."""
    cluster = settings.key_layout == "cluster"
    if settings.key_layout == "auto":
        url = settings.redis_url or redis_url_from_env()
        cluster = url is not None and is_cluster_url(url)
    return KeyLayout(prefix=settings.key_prefix, cluster=cluster)


def _where(settings: Settings, manager: CheckpointManager, runtime: bool) -> str:
    redis_url = settings.redis_url or redis_url_from_env() or "embedded redis-server"
    durable = redact_durable_url(settings.durable_url or durable_url_from_env())
    redis = (
        f"{redact_url(redis_url)} (Redis {manager.runtime.version()})"
        if runtime
        else "not needed by this command"
    )
    layout = "cluster" if _layout(settings).cluster else "reference"
    return (
        f"redis: {redis}; durable: {durable}; key prefix: {settings.key_prefix!r}; "
        f"key layout: {layout}"
    )


def require_known_task(manager: CheckpointManager, task_id: str) -> None:
    """Raise ``CheckpointNotFoundError`` unless the task has checkpoints, runtime keys or
    durable rows: a mistyped task id is reported, not silently checkpointed empty."""
    if manager.list_checkpoints(task_id, limit=1):
        return
    if manager.store.read_durable(task_id).row_count or manager.runtime.task_keys(task_id):
        return
    raise CheckpointNotFoundError(
        f"unknown task {task_id!r}: no checkpoints, runtime keys or durable rows"
    )


def _newest_usable_id(manager: CheckpointManager, task_id: str) -> str | None:
    usable = manager.store.usable_checkpoints(task_id)
    return usable[0].checkpoint_id if usable else None


def _now() -> datetime:
    return datetime.now(UTC)


def max_bytes_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--max-bytes N``: how much of each value to print."""
    return click.option(
        "--max-bytes",
        type=click.IntRange(min=0),
        metavar="N",
        help=f"Print at most N bytes of each value, then '\u2026 (truncated, M bytes in all)'. "
        f"Default: {DEFAULT_MAX_BYTES} in text; with --json, values are exact unless this is "
        'given (then cut values are marked "truncated"). 0: no limit.',
    )(command)


def _value_limit(settings: Settings, max_bytes: int | None) -> int | None:
    """The byte limit for values: ``None`` for none."""
    if max_bytes is None:
        return None if settings.json else DEFAULT_MAX_BYTES
    return max_bytes or None


# -- create ----------------------------------------------------------------------------------


@cli.command()
@click.argument("task")
@click.option(
    "--trigger",
    type=click.Choice([t.value for t in CheckpointTrigger]),
    default=CheckpointTrigger.MANUAL.value,
    show_default=True,
    help="Why the checkpoint is taken.",
)
@click.option(
    "--meta",
    "meta",
    multiple=True,
    type=MetaPair(),
    help="Metadata to keep with the checkpoint: KEY=VALUE (a string) or KEY:=JSON "
    "(a number, list, object...). Repeatable.",
)
@click.pass_obj
def create(settings: Settings, task: str, trigger: str, meta: tuple[tuple[str, Any], ...]) -> None:
    """Checkpoint TASK now: its runtime keys and its durable rows.

    If nothing changed since the task's newest checkpoint (TTLs ticking down do not
    count), that checkpoint is kept and nothing is stored. An unknown task (no
    checkpoints, keys or rows) is refused.

    --json: {"created": bool, "checkpoint": CHECKPOINT}.
    """
    metadata = meta_dict(meta)
    manager = open_manager(settings, runtime=True, create=True)
    require_known_task(manager, task)
    before = _newest_usable_id(manager, task)
    with settings.out.busy(f"checkpointing task {task}"):
        made = manager.create_checkpoint(task, trigger, metadata)
    created = made.checkpoint_id != before
    if settings.json:
        settings.out.json({"created": created, "checkpoint": checkpoint_json(made)})
    elif created:
        settings.out.line(
            f"created checkpoint {made.checkpoint_id} of task {task}: "
            f"{count(made.key_count, 'key')}, {count(made.row_count, 'row')}, "
            f"{human_size(made.stored_bytes)} stored "
            f"(dedup {dedup_text(made)})"
        )
    else:
        settings.out.line(
            f"unchanged: task {task} is as at checkpoint {made.checkpoint_id}; nothing stored"
        )


# -- list, tasks, show -----------------------------------------------------------------------


@cli.command(name="list")
@click.argument("task", required=False)
@click.option(
    "--status",
    type=click.Choice([s.value for s in CheckpointStatus]),
    help="Only checkpoints with this status.",
)
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="At most N, newest first.")
@click.pass_obj
def list_(settings: Settings, task: str | None, status: str | None, limit: int | None) -> None:
    """List checkpoints, newest first (of TASK, when given).

    Columns: id, task, trigger, status, age, keys, rows, stored (compressed bytes the
    checkpoint added to the store) and dedup = 1 - stored/raw, where raw is the size of
    its encoded state before compression and deduplication: the share it did not have
    to store anew because it was shared with other checkpoints or compressed away.

    --json: [CHECKPOINT, ...].
    """
    manager = open_manager(settings)
    found = manager.list_checkpoints(task, status=status, limit=limit)
    if not found and task is not None:
        require_known_task(manager, task)
    now = _now()
    if settings.json:
        settings.out.json([checkpoint_json(m, now) for m in found])
    elif not found:
        settings.out.line("no checkpoints")
    else:
        rows = [checkpoint_row(m, now) for m in found]
        settings.out.table(CHECKPOINT_COLUMNS, rows, right=CHECKPOINT_RIGHT)


@cli.command()
@click.pass_obj
def tasks(settings: Settings) -> None:
    """List every task with checkpoints or live runtime keys.

    For each: its live keys, its number of checkpoints, and its newest usable
    (completed or recovered) checkpoint and how old it is.

    --json: [{"task_id", "live_keys", "checkpoints", "newest": CHECKPOINT | null}, ...].
    """
    manager = open_manager(settings, runtime=True)
    with settings.out.busy("listing tasks"):
        summaries = manager.tasks()
    now = _now()
    if settings.json:
        settings.out.json([task_json(s, now) for s in summaries])
    elif not summaries:
        settings.out.line("no tasks")
    else:
        columns = ("task", "live keys", "checkpoints", "newest", "status", "age")
        rows = [task_row(s, now) for s in summaries]
        settings.out.table(columns, rows, right=("live keys", "checkpoints", "age"))


@cli.command()
@click.argument("checkpoint")
@click.option("--keys", "list_keys", is_flag=True, help="List every key: type, TTL, size.")
@click.option(
    "--value",
    "value_key",
    metavar="KEY",
    help="Print one key's value (JSON pretty-printed). KEY is the full key or the part "
    "after the task's prefix (coder for agent:<task>:coder); a key that is not UTF-8 is "
    "given as its bytes, or as the b'...' literal --keys prints.",
)
@max_bytes_option
@click.pass_obj
def show(
    settings: Settings,
    checkpoint: str,
    list_keys: bool,
    value_key: str | None,
    max_bytes: int | None,
) -> None:
    """Show a checkpoint: its metadata and its contents by namespace.

    Runtime keys are counted per namespace (agents, signals, queues, locks) and durable
    rows per table; the checkpoint is verified against its hashes as it is read. TTLs
    are as they were at capture.

    --json: {"checkpoint": CHECKPOINT, "namespaces": {NAME: {"keys", "bytes"}},
    "tables": {TABLE: rows}, "skills": n, "keys": [KEY] (with --keys), "value": KEY
    with "value" (with --value)}.
    """
    limit = _value_limit(settings, max_bytes)
    manager = open_manager(settings)
    with settings.out.busy(f"loading checkpoint {checkpoint}"):
        contents = manager.load_checkpoint(checkpoint)
    layout = manager.layout
    entry = _value_entry(layout, contents, value_key) if value_key is not None else None
    if settings.json:
        settings.out.json(_show_json(layout, contents, list_keys, entry, limit))
        return
    _show_text(settings.out, layout, contents)
    if list_keys:
        settings.out.line()
        rows = [entry_row(e) for e in contents.entries]
        settings.out.table(("key", "type", "ttl", "size"), rows, right=("ttl", "size"))
    if entry is not None:
        settings.out.line()
        _print_value(settings.out, entry, limit)


def key_arguments(text: str) -> list[bytes]:
    """The key names a ``--value`` argument may mean, in order: the bytes of a ``b'...'``
    literal (as ``--keys`` prints a key that is not UTF-8), then the argument's own bytes
    (as the shell passed them, undecodable bytes included)."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    literal = _bytes_literal(text)
    return [raw] if literal is None or literal == raw else [literal, raw]


def _bytes_literal(text: str) -> bytes | None:
    """The value of ``text`` when it is a Python bytes literal (``b'\\x80ab'``), else ``None``."""
    if len(text) < 3 or text[0] not in "bB" or text[1] not in "'\"" or text[-1] != text[1]:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, bytes) else None


def _key_label(raw: bytes) -> str:
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)


def _value_entry(layout: KeyLayout, contents: CheckpointContents, name: str) -> RuntimeEntry:
    candidates = key_arguments(name)
    found: list[RuntimeEntry] = []
    for raw in candidates:
        found = find_entry(layout, contents.meta.task_id, contents.entries, raw)
        if found:
            break
    label = _key_label(raw if found else candidates[0])
    if not found:
        raise CheckpointNotFoundError(
            f"checkpoint {contents.meta.checkpoint_id} has no key {label}"
        )
    if len(found) > 1:
        names = ", ".join(one_line(show_bytes(e.key)) for e in found)
        raise ValidationError(f"{label} matches several keys ({names}); give the full key")
    return found[0]


def _show_json(
    layout: KeyLayout,
    contents: CheckpointContents,
    list_keys: bool,
    entry: RuntimeEntry | None,
    limit: int | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "checkpoint": checkpoint_json(contents.meta),
        "namespaces": namespace_counts(layout, contents.meta.task_id, contents.entries),
        "tables": {name: len(t.rows) for name, t in contents.tables.items()},
        "skills": len(contents.skills.rows),
    }
    if list_keys:
        out["keys"] = [entry_json(e, value=False) for e in contents.entries]
    if entry is not None:
        out["value"] = entry_json(entry, max_bytes=limit)
    return out


def _show_text(out: Output, layout: KeyLayout, contents: CheckpointContents) -> None:
    out.table(("field", "value"), checkpoint_fields(contents.meta), header=False)
    out.line()
    counts = namespace_counts(layout, contents.meta.task_id, contents.entries)
    rows = [[name, str(c["keys"]), human_size(c["bytes"])] for name, c in counts.items()]
    out.table(("namespace", "keys", "size"), rows, right=("keys", "size"))
    out.line()
    tables = [[name, str(len(t.rows))] for name, t in contents.tables.items()]
    tables.append(["skill_metadata (global, not restored)", str(len(contents.skills.rows))])
    out.table(("durable table", "rows"), tables, right=("rows",))


def _print_value(out: Output, entry: RuntimeEntry, limit: int | None) -> None:
    ttl = "no TTL" if entry.pttl_ms is None else f"TTL {entry.pttl_ms} ms at capture"
    out.line(f"{one_line(show_bytes(entry.key))} ({entry_type(entry)}, {ttl})")
    lines, _ = value_view(entry, limit)
    for text in lines:
        out.line(text)


# -- diff and recover ------------------------------------------------------------------------

_DIFF_VERBS = {Change.ADDED: "added", Change.REMOVED: "removed", Change.CHANGED: "changed"}
#: A recovery plan goes from the task as it is to the checkpoint.
_PLAN_VERBS = {Change.ADDED: "restore", Change.REMOVED: "delete", Change.CHANGED: "overwrite"}


@cli.command()
@click.argument("old")
@click.argument("new", required=False)
@click.option("--live", is_flag=True, help="Compare OLD with the task as it is now.")
@max_bytes_option
@click.pass_obj
def diff(settings: Settings, old: str, new: str | None, live: bool, max_bytes: int | None) -> None:
    """Show what differs between checkpoints OLD and NEW, or OLD and the live task.

    Runtime keys and durable rows added, removed and changed, then a unified diff of
    each changed value (JSON pretty-printed with sorted keys; bytes that are not UTF-8
    shown as b'...' literals). TTLs that merely shrank are no difference. With --live,
    OLD is taken as a recovery would restore it now (keys whose TTL ran out left out),
    so right after `recover` from OLD there is no difference.

    --json: {"old", "new" (id or "live"), "empty", "counts", "keys": [{"key", "change",
    "detail", "old": KEY | null, "new": KEY | null}], "rows": [{"table", "row_id",
    "change", "old": ROW | null, "new": ROW | null}]}.
    """
    if live == (new is not None):
        raise click.UsageError("give either NEW or --live")
    manager = open_manager(settings, runtime=live)
    with settings.out.busy(f"comparing {old} with {new or 'the live task'}"):
        changes = manager.diff(old, new)
    new_label = new or "live"
    limit = _value_limit(settings, max_bytes)
    if settings.json:
        settings.out.json({"old": old, "new": new_label, **diff_json(changes, limit)})
    elif changes.empty:
        settings.out.line(f"no differences between {old} and {new_label}")
    else:
        _print_changes(settings.out, changes, _DIFF_VERBS, old, new_label, limit)


def _counts_line(changes: StateDiff, verbs: dict[Change, str]) -> str:
    counts = changes.counts()
    parts = []
    for tier in ("keys", "rows"):
        found = [f"{verbs[c]} {counts[f'{tier}_{c.value}']}" for c in Change]
        parts.append(f"{tier}: " + ", ".join(found))
    return "; ".join(parts)


def _print_changes(
    out: Output,
    changes: StateDiff,
    verbs: dict[Change, str],
    old: str,
    new: str,
    limit: int | None,
) -> None:
    out.line(_counts_line(changes, verbs))
    if changes.keys:
        out.line()
        rows = [key_change_row(c, verbs) for c in changes.keys]
        out.table(("", "change", "key", "type", "detail"), rows)
    if changes.rows:
        out.line()
        rows = [row_change_row(c, verbs) for c in changes.rows]
        out.table(("", "change", "table", "id", "columns"), rows)
    lines = [line for c in changes.keys for line in key_value_diff(c, old, new, limit)]
    lines += [line for c in changes.rows for line in row_value_diff(c, old, new, limit)]
    if lines:
        out.line()
        out.diff_lines(lines)


@cli.command()
@click.argument("task")
@click.option("--checkpoint", "checkpoint_id", metavar="ID", help="Default: the newest intact.")
@click.option(
    "--tiers",
    type=Tiers(),
    default="runtime",
    show_default=True,
    help="What to restore: runtime keys, durable rows, or both (runtime,durable).",
)
@click.option("--dry-run", is_flag=True, help="Print exactly what would change; change nothing.")
@max_bytes_option
@click.pass_obj
def recover(
    settings: Settings,
    task: str,
    checkpoint_id: str | None,
    tiers: frozenset[str],
    dry_run: bool,
    max_bytes: int | None,
) -> None:
    """Put TASK back as it was at a checkpoint.

    Without --checkpoint the newest intact usable checkpoint is used (corrupt ones are
    skipped, and said so). Runtime keys are replaced atomically: keys created since are
    removed, TTLs come back per the TTL policy (a lock whose TTL ran out stays away).
    With durable in --tiers the task's rows are replaced in the same transaction.
    The checkpoint stays usable.

    --json: {"dry_run": false, "result": {...}} or, with --dry-run, {"dry_run": true,
    "task_id", "checkpoint": CHECKPOINT, "tiers", "changes": DIFF, "expired_keys",
    "notes"}.
    """
    manager = open_manager(settings, runtime=True)
    runtime, durable = "runtime" in tiers, "durable" in tiers
    if dry_run:
        limit = _value_limit(settings, max_bytes)
        _plan(settings, manager, task, checkpoint_id, runtime, durable, limit)
        return
    with settings.out.busy(f"recovering task {task}"):
        result = manager.recover_from_checkpoint(
            task, checkpoint_id, restore_runtime=runtime, restore_durable=durable
        )
    if settings.json:
        settings.out.json({"dry_run": False, "result": recovery_json(result)})
        return
    for note in result.errors:
        settings.out.note(f"note: {one_line(note)}")
    settings.out.line(recovery_line(result))


def _plan(
    settings: Settings,
    manager: CheckpointManager,
    task: str,
    checkpoint_id: str | None,
    runtime: bool,
    durable: bool,
    limit: int | None,
) -> None:
    with settings.out.busy(f"planning the recovery of task {task}"):
        plan = manager.plan_recovery(
            task, checkpoint_id, restore_runtime=runtime, restore_durable=durable
        )
    cp = plan.checkpoint
    tiers = [name for name, on in (("runtime", runtime), ("durable", durable)) if on]
    if settings.json:
        settings.out.json(plan_json(plan, task, tiers, limit))
        return
    for note in plan.notes:
        settings.out.note(f"note: {one_line(note)}")
    settings.out.line(
        f"dry run: recovering task {task} ({' and '.join(tiers)}) from checkpoint "
        f"{cp.checkpoint_id} ({cp.trigger.value}, {cp.status.value})"
    )
    if plan.changes.empty:
        settings.out.line("would change nothing: the task is as at that checkpoint")
    else:
        _print_changes(settings.out, plan.changes, _PLAN_VERBS, "now", cp.checkpoint_id, limit)
    for key in plan.expired_keys:
        settings.out.line(f"would leave out {one_line(show_bytes(key))}: its TTL ran out")
    settings.out.line("nothing was changed (dry run)")


# -- cleanup ---------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--older-than",
    type=Duration(),
    default="7d",
    show_default=True,
    help="Remove checkpoints created longer ago than this (30s, 5m, 2h, 7d, 1w).",
)
@click.option(
    "--keep-last",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Always keep each task's N newest usable checkpoints.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
@click.pass_obj
def cleanup(settings: Settings, older_than: timedelta, keep_last: int, dry_run: bool) -> None:
    """Remove old checkpoints and the stored payloads nothing references any more.

    A task's newest usable checkpoint is never removed (--keep-last of them).

    --json: {"dry_run", "older_than_seconds", "keep_last", "checkpoint_ids",
    "payloads_removed", "bytes_freed"}.
    """
    manager = open_manager(settings)
    with settings.out.busy("cleaning up"):
        result = manager.cleanup(older_than=older_than, keep_last=keep_last, dry_run=dry_run)
    if settings.json:
        settings.out.json(_cleanup_json(result, older_than, keep_last, dry_run))
        return
    for checkpoint_id in result.checkpoint_ids:
        settings.out.line(("would remove " if dry_run else "removed ") + checkpoint_id)
    verb = "would remove" if dry_run else "removed"
    settings.out.line(
        f"{verb} {count(len(result.checkpoint_ids), 'checkpoint')} older than "
        f"{format_duration(older_than)} and {count(result.payloads_removed, 'payload')} "
        f"({human_size(result.bytes_freed)})" + ("; nothing was changed" if dry_run else "")
    )


def _cleanup_json(
    result: CleanupResult, older_than: timedelta, keep_last: int, dry_run: bool
) -> dict[str, Any]:
    return {
        "dry_run": dry_run,
        "older_than_seconds": older_than.total_seconds(),
        "keep_last": keep_last,
        "checkpoint_ids": list(result.checkpoint_ids),
        "payloads_removed": result.payloads_removed,
        "bytes_freed": result.bytes_freed,
    }


# -- export, import, verify ------------------------------------------------------------------


@cli.command(name="export")
@click.argument("checkpoint")
@click.option(
    "-o",
    "--output",
    "path",
    required=True,
    type=click.Path(dir_okay=False, writable=True, allow_dash=True),
    help="The file to write (replaced if it exists); - for stdout.",
)
@click.pass_obj
def export_(settings: Settings, checkpoint: str, path: str) -> None:
    """Write CHECKPOINT to one portable, integrity-checked file.

    The checkpoint is verified first; the file carries every payload with its hash and
    a hash of the whole file. It is written beside FILE and renamed into place, so a
    failed export leaves nothing behind. With -o - the file goes to stdout (not to a
    terminal) and the summary to stderr.

    --json: {"checkpoint_id", "task_id", "path", "bytes"}.
    """
    to_stdout = path == "-"
    stdout = sys.stdout.buffer
    if to_stdout and stdout.isatty():
        raise ValidationError(
            "not writing an export file to a terminal: redirect stdout or give -o FILE"
        )
    manager = open_manager(settings)
    meta = manager.get_checkpoint(checkpoint)
    with settings.out.busy(f"exporting checkpoint {checkpoint}"):
        if to_stdout:
            with tempfile.TemporaryDirectory(prefix="cfn-export-") as tmp:
                file = Path(tmp) / "export.cfnckpt"
                size = manager.export_checkpoint(checkpoint, file)
                with file.open("rb") as src:
                    write_binary(src, stdout)
        else:
            size = manager.export_checkpoint(checkpoint, path)
    summary = {"checkpoint_id": checkpoint, "task_id": meta.task_id, "path": path, "bytes": size}
    if settings.json:
        settings.out.json(summary, err=to_stdout)
        return
    where = "stdout" if to_stdout else path
    text = (
        f"exported checkpoint {checkpoint} of task {meta.task_id} to {where} ({human_size(size)})"
    )
    if to_stdout:
        settings.out.note(text)
    else:
        settings.out.line(text)


@cli.command(name="import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.pass_obj
def import_(settings: Settings, file: str) -> None:
    """Add the checkpoint in FILE (from `export`) to this durable store; - reads stdin.

    The file is verified in full before anything is stored; a truncated or altered file
    is refused (exit 4), and so is a checkpoint id that already exists here (exit 2).
    Recover from it with `recover TASK --checkpoint ID`.

    --json: CHECKPOINT.
    """
    if file != "-":
        _import_file(settings, Path(file), file)
        return
    stdin = sys.stdin.buffer
    if stdin.isatty():
        raise ValidationError(
            "not reading an export file from a terminal: pipe one in or give FILE"
        )
    with tempfile.TemporaryDirectory(prefix="cfn-import-") as tmp:
        copy = Path(tmp) / "stdin.cfnckpt"
        with copy.open("wb") as out:
            shutil.copyfileobj(stdin, out, 1 << 20)
        try:
            _import_file(settings, copy, "stdin")
        except CheckpointError as exc:  # name stdin, not the temporary copy
            message = exc.message.replace(str(copy), "stdin")
            raise type(exc)(message, code=exc.code) from exc


def _import_file(settings: Settings, file: Path, name: str) -> None:
    if _missing_store_file(settings.durable_url) is not None:
        # A new store: check the file before the database is created, so that a bad
        # file leaves nothing behind.
        with settings.out.busy(f"verifying {name}"):
            read_export(file)
    manager = open_manager(settings, create=True)
    with settings.out.busy(f"importing {name}"):
        meta = manager.import_checkpoint(file)
    if settings.json:
        settings.out.json(checkpoint_json(meta))
    else:
        settings.out.line(
            f"imported checkpoint {meta.checkpoint_id} of task {meta.task_id}: "
            f"{count(meta.key_count, 'key')}, {count(meta.row_count, 'row')}, "
            f"{human_size(meta.stored_bytes)} stored"
        )


@cli.command()
@click.argument("checkpoint", required=False)
@click.option("--all", "all_", is_flag=True, help="Every completed or recovered checkpoint.")
@click.option("--task", metavar="TASK", help="With --all: only this task's checkpoints.")
@click.pass_obj
def verify(settings: Settings, checkpoint: str | None, all_: bool, task: str | None) -> None:
    """Check stored checkpoints against their hashes: CHECKPOINT, or --all.

    Every payload is decompressed and compared with its content hash, and the state
    hash with the catalog. Exits with 4 if any checkpoint is corrupt, naming them.

    --json: {"checked": n, "corrupt": n, "results": [{"checkpoint_id", "task_id",
    "ok", "error"}]}.
    """
    if all_ == (checkpoint is not None):
        raise click.UsageError("give either CHECKPOINT or --all")
    if task is not None and not all_:
        raise click.UsageError("--task goes with --all")
    manager = open_manager(settings)
    if checkpoint is not None:
        targets = [manager.get_checkpoint(checkpoint)]
    else:
        targets = [m for m in manager.list_checkpoints(task) if m.status in USABLE_STATUSES]
        if not targets and task is not None:
            require_known_task(manager, task)
    results = _verify_each(settings.out, manager, targets)
    _report_verify(settings, results)


def _verify_each(
    out: Output, manager: CheckpointManager, targets: list[CheckpointMetadata]
) -> list[tuple[CheckpointMetadata, CorruptCheckpointError | None]]:
    results: list[tuple[CheckpointMetadata, CorruptCheckpointError | None]] = []
    with out.progress("verifying", len(targets)) as bar:
        for meta in targets:
            try:
                manager.verify_checkpoint(meta.checkpoint_id)
            except CorruptCheckpointError as exc:
                results.append((meta, exc))
            else:
                results.append((meta, None))
            advance(bar)
    return results


def _report_verify(
    settings: Settings, results: list[tuple[CheckpointMetadata, CorruptCheckpointError | None]]
) -> None:
    corrupt = [(m, e) for m, e in results if e is not None]
    if settings.json:
        settings.out.json(verify_json(results))
    elif not results:
        settings.out.line("no checkpoints to verify")
    else:
        rows = [
            [m.checkpoint_id, m.task_id, "ok" if e is None else f"CORRUPT: {one_line(e.message)}"]
            for m, e in results
        ]
        settings.out.table(("checkpoint", "task", "result"), rows)
    if corrupt:
        names = ", ".join(m.checkpoint_id for m, _ in corrupt)
        fail(f"{len(corrupt)} of {count(len(results), 'checkpoint')} corrupt: {names}", 4)


# -- watch -----------------------------------------------------------------------------------

#: The shortest ``watch --interval``.
WATCH_MIN_INTERVAL = timedelta(milliseconds=100)


@cli.command()
@click.option(
    "--interval",
    type=Duration(minimum=WATCH_MIN_INTERVAL),
    default="5m",
    show_default=True,
    help="Time between the starts of rounds (300ms, 30s, 5m, ...; at least 100ms).",
)
@click.option(
    "--task",
    "tasks",
    multiple=True,
    metavar="TASK",
    help="Checkpoint this task (repeatable). Default: every task with runtime keys.",
)
@click.option(
    "--retention",
    type=Duration(),
    default="7d",
    show_default=True,
    help="After each round, remove checkpoints older than this (each task's newest kept).",
)
@click.option("--no-cleanup", is_flag=True, help="Do not remove old checkpoints.")
@click.pass_obj
def watch(
    settings: Settings,
    interval: timedelta,
    tasks: tuple[str, ...],
    retention: timedelta,
    no_cleanup: bool,
) -> None:
    """Take periodic checkpoints until stopped with Ctrl-C or SIGTERM.

    Every --interval, each task (trigger periodic): a task that did not change keeps
    its checkpoint and nothing is stored. Then retention cleanup. Rounds start at a
    fixed rate; one that overruns the interval skips the starts it missed. One line per
    checkpoint (created, unchanged or error) and per cleanup that removed something.
    created means this watch stored the checkpoint: one another process stored while
    this watch was checkpointing the task is logged unchanged (two processes
    checkpointing one task within the same instant may still both log created).
    On SIGINT or SIGTERM the checkpoint in flight finishes (atomically) and the command
    exits with 0.

    --json: one JSON object per line: {"time", "event" (created, unchanged, error,
    cleanup), "task_id", "checkpoint": CHECKPOINT | "error": message | "removed": n}.
    """
    config = CheckpointConfig(
        retention_period=retention,
        enable_auto_cleanup=not no_cleanup,
        # Cleanup is left to the rounds, which log it; none inside create_checkpoint.
        periodic_interval=timedelta(days=36_500),
    )
    manager = open_manager(settings, runtime=True, create=True, config=config)
    for task in tasks:
        require_known_task(manager, task)
    watcher = Watcher(
        manager,
        log=WatchLog(settings.out),
        interval=interval,
        tasks=list(tasks) or None,
        cleanup=not no_cleanup,
    )
    which = ", ".join(tasks) if tasks else "every task with runtime keys"
    settings.out.note(f"watching {which} every {format_duration(interval)}; Ctrl-C stops")
    with stop_on_signals(watcher.stopping):
        watcher.run_forever()
    settings.out.note("stopped")


# -- demo and docs ---------------------------------------------------------------------------


@cli.command(short_help="Crash and recover a simulated task; check it.")
@click.option(
    "--redis-url",
    "demo_redis_url",
    metavar="URL",
    help="Run on this Redis instead (overrides the global --redis-url); the demo's keys "
    "live under a unique prefix and are removed afterwards.",
)
@click.option("--tamper", is_flag=True, hidden=True, help="Damage the restored state (tests).")
@click.pass_obj
def demo(settings: Settings, demo_redis_url: str | None, tamper: bool) -> None:
    """Checkpoint, crash and recover a simulated CFN Loop task; check the result.

    Four agents work for three iterations with a checkpoint at each boundary; then
    the task's runtime keys and audit rows are lost and it is recovered. Every key
    and row is compared with what plain Redis commands and SQL read right after the
    last checkpoint. Runs on an embedded redis-server unless a Redis URL is given,
    with the durable tier in a temporary SQLite file (--durable-url is not used).
    Exits with 1 if anything differs.

    --json: {"ok", "task_id", "redis", "durable_url", "seconds", "checks": [{"tier",
    "name", "expected", "restored", "ok", "note", "problems"}], "problems",
    "checkpoints": [CHECKPOINT], "recovery": {...}}; the steps go to stderr with -v.
    """
    url = demo_redis_url or settings.redis_url
    echo = settings.out.info if settings.json else settings.out.line
    report = run_demo(redis_url=url, tamper=tamper, echo=echo)
    if settings.json:
        settings.out.json(report_json(report))
    else:
        settings.out.line(format_report(report))
    if not report.ok:
        fail("the recovered state differs from the last checkpoint", 1)


@cli.command(hidden=True)
@click.option(
    "-o",
    "--output",
    "path",
    type=click.Path(dir_okay=False),
    help="Write to this file instead of stdout.",
)
def docs(path: str | None) -> None:
    """Print docs/cli.md: the command reference, generated from this command's help."""
    text = render_docs(cli, EXIT_CODE_MEANINGS)
    if path is None:
        click.echo(text, nl=False)
    else:
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cfn-checkpoint`` console script."""
    try:
        cli.main(args=argv, prog_name="cfn-checkpoint")
    except BrokenPipeError:  # stdout's reader went away outside any command
        _silence_stdout()
        sys.exit(EXIT_STDOUT_CLOSED)


if __name__ == "__main__":
    main(sys.argv[1:])
