"""Generates ``docs/cli.md`` from the command's own help, so the reference cannot drift.

``python -m cfn_checkpoint.cli docs -o docs/cli.md`` writes it; a test fails when the
file differs from what this module produces now.
"""

from __future__ import annotations

from collections.abc import Sequence

import click

#: Help is laid out for this many columns, whatever the terminal.
WIDTH = 88
PROG = "cfn-checkpoint"

_INTRO = """\
# Command-line reference

<!-- Generated from the command's own help by `python -m cfn_checkpoint.cli docs -o
docs/cli.md`; do not edit by hand. tests/test_cli_docs.py fails when it is out of date. -->

`cfn-checkpoint` inspects, compares, recovers, exports and watches checkpoints of
multi-agent tasks. Every command takes the global options before its name; `--json` and
`-v` may also follow it (`list --json` is `--json list`):

```sh
cfn-checkpoint --redis-url redis://127.0.0.1:6379/0 \\
    --durable-url sqlite:////var/lib/cfn/cfn.db list my-task
CFN_REDIS_URL=redis://127.0.0.1:6379/0 cfn-checkpoint --json tasks
cfn-checkpoint list my-task --json
```

Errors are one line on stderr, `error: <what was wrong>`, and an exit code; `-v` adds
the traceback. Progress (a spinner or a bar) appears on stderr only when it is a
terminal; piped output carries nothing extra. When stdout's reader goes away early
(`cfn-checkpoint list | head -1`), the command stops quietly with exit code 141.
Commands that only read the durable tier refuse a SQLite file that does not exist rather
than create an empty one.
Durations (`300ms`, `30s`, `5m`, `2h`, `7d`, `1w`, `1h 30m`) are at most 100 years
(`36500d`). `show --value`, `diff` and `recover --dry-run` print at most 4 KiB of each value in text
(`--max-bytes`), ending a longer one with `… (truncated, N bytes in all)`.

`export CHECKPOINT -o -` writes the export file to stdout and `import -` reads one from
stdin, so a checkpoint can move between stores in one pipeline:

```sh
cfn-checkpoint --durable-url sqlite:////a.db export CP -o - \\
    | ssh other-host cfn-checkpoint --durable-url sqlite:////b.db import -
```
"""

_JSON = """\
## JSON output

With `--json` every command prints one JSON document on stdout (`watch`: one object per
line) instead of tables; errors still go to stderr with the same exit codes. Values are
exact: sizes in bytes, times as ISO-8601 UTC, ages in seconds, TTLs in milliseconds
(`null`: no TTL). Bytes (key names, values, row values) are a string when they are
UTF-8 and `{"base64": "..."}` when not.

- **CHECKPOINT**: the catalog row: `checkpoint_id`, `task_id`, `trigger`, `status`,
  `state_hash`, `runtime_state_hash`, `durable_state_hash`, `created_at`,
  `completed_at`, `error`, `metadata`, `key_count`, `row_count`, `raw_bytes` (the
  encoded state before compression and deduplication), `stored_bytes` (compressed bytes
  this checkpoint added to the store), `point_in_time`, `format_version`,
  `redis_version`, `last_recovered_at`, `recovery_count`; plus `age_seconds` and
  `dedup_ratio` = max(0, 1 - stored_bytes / raw_bytes).
- **KEY**: `{"key", "type", "ttl_ms", "size", "value"}`; `value` is a string for
  strings and DUMP payloads (streams and module types), a list for lists and sets,
  and `[field, value]` (hashes) or `[member, score]` (sorted sets) pairs. A sorted-set
  score is a string, exactly as Redis gives it (`"1.5"`, `"inf"`, `"-inf"`): exact, and
  JSON has no infinity. With `--max-bytes N` a value longer than N bytes is cut (a
  string to its first N bytes, a collection to its first elements that fit) and the
  KEY gets `"truncated": true`; a changed row in a DIFF gets `"truncated": [column,
  ...]`, naming the columns whose text or bytes were cut.
- **ROW**: `{column: value}` of one durable row.
- **DIFF**: `{"empty", "counts", "keys", "rows"}` as `diff` prints it.
"""


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    # make_context applies the command's context_settings (-h, for one), as a real run
    # does; resilient parsing lets arguments be missing.
    return command.make_context(
        name,
        [],
        parent=parent,
        resilient_parsing=True,
        terminal_width=WIDTH,
        max_content_width=WIDTH,
    )


def _section(title: str, text: str) -> str:
    return f"## `{title}`\n\n```text\n{text.rstrip()}\n```\n"


def _exit_codes(meanings: Sequence[tuple[int, str]]) -> str:
    lines = ["## Exit codes", "", "| code | meaning |", "| --- | --- |"]
    lines += [f"| {code} | {meaning} |" for code, meaning in meanings]
    return "\n".join(lines) + "\n"


def render_docs(group: click.Group, exit_codes: Sequence[tuple[int, str]]) -> str:
    """The whole of ``docs/cli.md``: intro, exit codes, JSON shapes, then every visible
    command's ``--help`` exactly as the command prints it."""
    root = _context(group, PROG, None)
    parts = [_INTRO, _exit_codes(exit_codes), _JSON, _section(PROG, group.get_help(root))]
    for name in documented_commands(group):
        command = group.get_command(root, name)
        assert command is not None
        sub = _context(command, name, root)
        parts.append(_section(f"{PROG} {name}", command.get_help(sub)))
    return "\n".join(parts)


def documented_commands(group: click.Group) -> list[str]:
    """Names of the commands the reference documents (every one that is not hidden)."""
    root = click.Context(group, info_name=PROG)
    return [
        name
        for name in group.list_commands(root)
        if (command := group.get_command(root, name)) is not None and not command.hidden
    ]
