"""What ``cfn-checkpoint watch`` runs: periodic checkpoints logged one line each, stopped by
SIGINT or SIGTERM after the checkpoint in flight."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from ._render import Output, count, human_size, one_line
from ._views import checkpoint_json
from .errors import CheckpointError
from .manager import CheckpointManager
from .scheduler import PeriodicCheckpointer, PeriodicOutcome


class WatchLog:
    """One line per periodic checkpoint (created, unchanged, error) and per cleanup."""

    def __init__(self, out: Output) -> None:
        self.out = out

    @staticmethod
    def _stamp() -> str:
        now = datetime.now(UTC)
        return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"

    def outcome(self, outcome: PeriodicOutcome) -> None:
        """Log what one periodic checkpoint of one task did."""
        cp = outcome.checkpoint
        if cp is None:
            message = outcome.error.message if outcome.error else "unknown error"
            self._emit("error", outcome.task_id, one_line(message), {"error": message})
            return
        event = "created" if outcome.created else "unchanged"
        text = cp.checkpoint_id
        if outcome.created:
            text += f" keys={cp.key_count} rows={cp.row_count} stored={human_size(cp.stored_bytes)}"
        self._emit(event, outcome.task_id, text, {"checkpoint": checkpoint_json(cp)})

    def cleanup(self, removed: int) -> None:
        """Log a retention cleanup that removed checkpoints."""
        self._emit(
            "cleanup", None, f"removed {count(removed, 'old checkpoint')}", {"removed": removed}
        )

    def error(self, exc: CheckpointError) -> None:
        """Log a round that failed before or after its checkpoints."""
        self._emit("error", None, one_line(exc.message), {"error": exc.message})

    def _emit(self, event: str, task: str | None, text: str, data: dict[str, Any]) -> None:
        stamp = self._stamp()
        if self.out.json_mode:
            self.out.json_line({"time": stamp, "event": event, "task_id": task, **data})
        else:
            self.out.line(f"{stamp} {event:<9} {task or '-'} {text}")


class Watcher(PeriodicCheckpointer):
    """Periodic checkpoints that log each outcome and cleanup, and survive a failing round.

    Rounds run at a fixed rate: the n-th starts ``n * interval`` after the first, however
    long each takes; a round that overruns makes the rounds whose start it missed be
    skipped. A checkpoint counts as created only if it was created after this watch
    asked for it: when another process checkpointed the task meanwhile, the checkpoint
    it made is logged ``unchanged`` here.
    """

    def __init__(self, manager: CheckpointManager, *, log: WatchLog, **options: Any) -> None:
        super().__init__(manager, on_outcome=log.outcome, **options)
        self.log = log

    def run_once(self) -> list[PeriodicOutcome]:
        before = self.removed
        try:
            outcomes = super().run_once()
        except CheckpointError as exc:
            self.log.error(exc)
            return []
        if self.removed > before:
            self.log.cleanup(self.removed - before)
        return outcomes

    def _checkpoint(self, task: str) -> PeriodicOutcome:
        asked = datetime.now(UTC)
        outcome = super()._checkpoint(task)
        cp = outcome.checkpoint
        if outcome.created and cp is not None and cp.created_at < asked:
            # Not ours: another process stored it between our look at the newest
            # checkpoint and our capture, which found the task unchanged since.
            return dataclasses.replace(outcome, created=False)
        return outcome

    def run_forever(self) -> None:
        """Rounds every ``interval``, at a fixed rate, until stopped; the first at once."""
        period = self.interval.total_seconds()
        first = time.monotonic()
        while not self.stopping.is_set():
            self.run_once()
            elapsed = time.monotonic() - first
            # The next round's start: the first slot still ahead (missed ones skipped).
            next_start = (math.floor(elapsed / period) + 1) * period
            self.stopping.wait(next_start - elapsed)


@contextlib.contextmanager
def stop_on_signals(stopping: threading.Event) -> Iterator[None]:
    """Until the block ends, SIGINT and SIGTERM set ``stopping`` (once; a second signal
    gets the previous handler, so a second Ctrl-C interrupts at once)."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: FrameType | None) -> None:
        # Set from another thread: this handler runs on the main thread, which may be
        # inside stopping.wait() holding the event's lock, and setting it here would
        # deadlock. The other thread sets it as soon as the lock is free.
        threading.Thread(target=stopping.set, daemon=True).start()
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
