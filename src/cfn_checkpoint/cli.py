"""The ``cfn-checkpoint`` command.

Library errors propagate up to here and nowhere else are they translated: a
:class:`~cfn_checkpoint.errors.CheckpointError` becomes one ``error: ...`` line on stderr
and an exit code (:data:`EXIT_CODES`): 1 failure, 2 usage or validation, 3 not found,
4 corrupt.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from . import __version__
from .demo import format_report, run_demo
from .errors import CheckpointError, ErrorCode

#: Exit code of each error code; anything not listed exits with 1 (failure).
EXIT_CODES: dict[ErrorCode, int] = {
    ErrorCode.VALIDATION: 2,
    ErrorCode.NOT_FOUND: 3,
    ErrorCode.CORRUPT: 4,
}


def exit_code_for(error: CheckpointError) -> int:
    """The exit code a :class:`CheckpointError` ends the command with."""
    return EXIT_CODES.get(error.code, 1)


def fail(message: str, exit_code: int = 1) -> NoReturn:
    """End the command: ``error: <message>`` as one line on stderr, then ``exit_code``."""
    click.echo(f"error: {' '.join(message.split())}", err=True)
    raise click.exceptions.Exit(exit_code)


class _Group(click.Group):
    """A group that turns library errors into a message and an exit code, at the boundary."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CheckpointError as exc:
            fail(exc.message or exc.code.value, exit_code_for(exc))


@dataclass(frozen=True, slots=True)
class Settings:
    """Options shared by every command (``ctx.obj``)."""

    #: ``--redis-url`` / ``CFN_REDIS_URL``; ``None``: ``CFN_REDIS_HOST``/``PORT``, else embedded.
    redis_url: str | None
    #: ``--durable-url`` / ``CFN_DURABLE_URL``; ``None``: the library's default.
    durable_url: str | None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="cfn-checkpoint")
@click.option(
    "--redis-url",
    envvar="CFN_REDIS_URL",
    show_envvar=True,
    metavar="URL",
    help="Redis of the runtime tier (redis://, rediss://, unix://). "
    "Default: CFN_REDIS_HOST/CFN_REDIS_PORT, else an embedded redis-server.",
)
@click.option(
    "--durable-url",
    envvar="CFN_DURABLE_URL",
    show_envvar=True,
    metavar="URL",
    help="Durable tier, sqlite:///path/to/file.db. Default: sqlite:///cfn-checkpoint.db.",
)
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None, durable_url: str | None) -> None:
    """Checkpoint and recover multi-agent task state across Redis and SQLite."""
    ctx.obj = Settings(redis_url=redis_url or None, durable_url=durable_url or None)


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
    """
    url = demo_redis_url or settings.redis_url
    report = run_demo(redis_url=url, tamper=tamper, echo=click.echo)
    click.echo(format_report(report))
    if not report.ok:
        fail("the recovered state differs from the last checkpoint", 1)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cfn-checkpoint`` console script."""
    cli.main(args=argv, prog_name="cfn-checkpoint")


if __name__ == "__main__":
    main(sys.argv[1:])
