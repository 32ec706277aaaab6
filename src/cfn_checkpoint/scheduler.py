"""Periodic checkpoints: every interval, a ``periodic`` checkpoint of each active task.

An unchanged task returns its existing checkpoint (nothing stored), so a quiet task
costs one capture per interval. Retention cleanup runs after each round. Stopping
waits for the checkpoint in flight, which is atomic either way: it ends completed
or leaves nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from .errors import CheckpointError, ValidationError
from .layout import validate_task_id
from .model import CheckpointMetadata, CheckpointTrigger

if TYPE_CHECKING:
    from .manager import CheckpointManager


@dataclass(frozen=True, slots=True)
class PeriodicOutcome:
    """What one periodic checkpoint of one task did."""

    task_id: str
    #: The checkpoint (new, or the unchanged existing one); ``None`` on error.
    checkpoint: CheckpointMetadata | None
    #: True when a new checkpoint was stored.
    created: bool
    error: CheckpointError | None = None


Listener = Callable[[PeriodicOutcome], None]


class PeriodicCheckpointer:
    """Takes periodic checkpoints of the given tasks (or every active one)."""

    def __init__(
        self,
        manager: CheckpointManager,
        *,
        interval: timedelta | None = None,
        tasks: Sequence[str] | None = None,
        cleanup: bool | None = None,
        on_outcome: Listener | None = None,
    ) -> None:
        self.manager = manager
        self.interval = manager.config.periodic_interval if interval is None else interval
        if not isinstance(self.interval, timedelta) or self.interval <= timedelta(0):
            raise ValidationError(f"interval must be a positive duration, not {self.interval}")
        self.tasks = [validate_task_id(t) for t in tasks] if tasks else None
        self.cleanup = manager.config.enable_auto_cleanup if cleanup is None else cleanup
        self.on_outcome = on_outcome
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: Checkpoints removed by cleanup so far.
        self.removed = 0

    def active_tasks(self) -> list[str]:
        """The tasks to checkpoint this round: the given ones, else those with runtime keys."""
        if self.tasks is not None:
            return list(self.tasks)
        return sorted(self.manager.runtime.task_ids())

    def run_once(self) -> list[PeriodicOutcome]:
        """One round: a periodic checkpoint of each task, then retention cleanup."""
        outcomes = []
        for task in self.active_tasks():
            if self.stopping.is_set():
                break
            outcome = self._checkpoint(task)
            outcomes.append(outcome)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
        if self.cleanup and not self.stopping.is_set():
            self.removed += self.manager.cleanup_old_checkpoints()
        return outcomes

    def _checkpoint(self, task: str) -> PeriodicOutcome:
        before = self.manager.store.usable_checkpoints(task)
        newest = before[0].checkpoint_id if before else None
        try:
            meta = self.manager.create_checkpoint(task, CheckpointTrigger.PERIODIC)
        except CheckpointError as exc:
            return PeriodicOutcome(task, None, False, exc)
        return PeriodicOutcome(task, meta, meta.checkpoint_id != newest)

    def run_forever(self) -> None:
        """Rounds every ``interval`` until :meth:`stop`; the first round runs at once."""
        while not self.stopping.is_set():
            self.run_once()
            self.stopping.wait(self.interval.total_seconds())

    def start(self) -> PeriodicCheckpointer:
        """Run in a background thread."""
        if self._thread is None or not self._thread.is_alive():
            self.stopping.clear()
            self._thread = threading.Thread(
                target=self.run_forever, name="cfn-periodic-checkpoints", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the checkpoint in flight (if any) has finished."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
