"""Errors raised by cfn-checkpoint.

Every error is a :class:`CheckpointError` carrying an :class:`ErrorCode`. The
original cause, when there is one, is kept as ``__cause__`` (``raise ... from``),
so nothing is flattened into a generic timeout.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """What kind of failure an error reports; stable, for programs and exit codes."""

    VALIDATION = "validation"
    NOT_FOUND = "not_found"
    CORRUPT = "corrupt"
    STORE_UNAVAILABLE = "store_unavailable"
    LOCK_TIMEOUT = "lock_timeout"
    RESTORE_FAILED = "restore_failed"


class CheckpointError(Exception):
    """Base of every error this library raises on purpose."""

    code: ErrorCode = ErrorCode.RESTORE_FAILED

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The one-line message, without the code."""
        return str(self.args[0]) if self.args else ""


class ValidationError(CheckpointError, ValueError):
    """Bad input: a task id, a trigger, an option or a URL that cannot be used."""

    code = ErrorCode.VALIDATION


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No checkpoint (or no usable checkpoint) matches the request."""

    code = ErrorCode.NOT_FOUND


class CorruptCheckpointError(CheckpointError):
    """A stored payload does not match its content hash or cannot be decoded."""

    code = ErrorCode.CORRUPT


class UnreadableFormatError(CorruptCheckpointError):
    """A checkpoint in a storage format this version does not read (a newer one wrote
    it). Not damage: recovery stops rather than fall back to an older checkpoint."""


class StoreUnavailableError(CheckpointError, ConnectionError):
    """Redis or the durable database cannot be reached or used."""

    code = ErrorCode.STORE_UNAVAILABLE


class LockTimeoutError(CheckpointError, TimeoutError):
    """Another create or recover of the same task held its lock for too long."""

    code = ErrorCode.LOCK_TIMEOUT


class RestoreError(CheckpointError):
    """Writing a checkpoint back failed; the task was left as it was before."""

    code = ErrorCode.RESTORE_FAILED
