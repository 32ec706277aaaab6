"""Where a task's runtime keys live in Redis, and which task ids are allowed.

Reference layout (compatible with the CFN Loop platform)::

    agent:<task>:<agent-id>   swarm:<task>:<name>   queue:<task>:<name>   lock:<task>:<name>

Cluster layout puts the task in a hash tag (``agent:{<task>}:<agent-id>``) so every
key of one task lives in one Redis Cluster slot.

A task id is one or more of ``A-Z a-z 0-9 . _ -`` (at most 200). Anything else,
``:`` in particular, would let one id reach into another task's keys, so it is
refused with a :class:`~cfn_checkpoint.errors.ValidationError` naming the character.
Glob characters in patterns sent to ``SCAN`` are escaped all the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ValidationError

MAX_TASK_ID_LENGTH = 200
_TASK_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9._-]+")
_GLOB_SPECIAL = re.compile(rb"([*?\[\]\\])")

#: Namespace roles, in the order they are listed and restored.
ROLES = ("agent", "signal", "queue", "lock")


def validate_task_id(task_id: object) -> str:
    """Return ``task_id`` if it is a usable task id, else raise ``ValidationError``."""
    if not isinstance(task_id, str):
        raise ValidationError(f"task id must be a string, not {type(task_id).__name__}")
    if not task_id:
        raise ValidationError("task id must not be empty")
    if len(task_id) > MAX_TASK_ID_LENGTH:
        raise ValidationError(
            f"task id is {len(task_id)} characters long; at most {MAX_TASK_ID_LENGTH} allowed"
        )
    if not _TASK_ID_RE.fullmatch(task_id):
        bad = next(ch for ch in task_id if not _TASK_ID_RE.fullmatch(ch))
        raise ValidationError(
            f"task id {task_id!r} contains {bad!r}; only letters, digits, '.', '_' and '-' "
            "are allowed"
        )
    return task_id


_CHECKPOINT_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,300}")


def validate_checkpoint_id(checkpoint_id: object) -> str:
    """Return ``checkpoint_id`` if it has the form of a checkpoint id, else raise."""
    if not isinstance(checkpoint_id, str) or not _CHECKPOINT_ID_RE.fullmatch(checkpoint_id):
        raise ValidationError(
            f"checkpoint id {checkpoint_id!r} must be 1 to 300 of letters, digits, '.', '_', '-'"
        )
    return checkpoint_id


def escape_glob(raw: bytes) -> bytes:
    """Escape ``*?[]\\`` so a Redis MATCH pattern takes them literally."""
    return _GLOB_SPECIAL.sub(rb"\\\1", raw)


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Key names for tasks: namespaces, an optional prefix, and the cluster hash tag."""

    agent: str = "agent"
    signal: str = "swarm"
    queue: str = "queue"
    lock: str = "lock"
    #: Put in front of every key (for example ``"tenant-a:"``); empty by default.
    prefix: str = ""
    #: Wrap the task id in ``{}`` so a task's keys share one Redis Cluster slot.
    cluster: bool = False

    def __post_init__(self) -> None:
        names = self.namespaces()
        for name in names:
            if not _NAMESPACE_RE.fullmatch(name):
                raise ValidationError(
                    f"namespace {name!r} must be letters, digits, '.', '_' or '-'"
                )
        if len(set(names)) != len(names):
            raise ValidationError(f"namespaces must differ from each other: {names}")
        if any(ch in self.prefix for ch in "{}*?[]\\"):
            raise ValidationError(f"key prefix {self.prefix!r} must not contain {{}}*?[]\\")

    def namespaces(self) -> tuple[str, str, str, str]:
        """The four namespaces in role order (agent, signal, queue, lock)."""
        return (self.agent, self.signal, self.queue, self.lock)

    def _task_part(self, task_id: str) -> str:
        return "{" + task_id + "}" if self.cluster else task_id

    def task_prefix(self, role: str, task_id: str) -> bytes:
        """The exact byte prefix of every key of ``task_id`` in ``role``'s namespace."""
        namespace = getattr(self, role)
        return f"{self.prefix}{namespace}:{self._task_part(validate_task_id(task_id))}:".encode()

    def task_prefixes(self, task_id: str) -> tuple[bytes, ...]:
        """The byte prefixes of all four namespaces of ``task_id``, in role order."""
        return tuple(self.task_prefix(role, task_id) for role in ROLES)

    def key(self, role: str, task_id: str, name: str | bytes) -> bytes:
        """The full key of ``name`` (agent id, signal, queue or lock name) of ``task_id``."""
        raw = name.encode() if isinstance(name, str) else name
        if not raw:
            raise ValidationError(f"{role} name must not be empty")
        return self.task_prefix(role, task_id) + raw

    def scan_pattern(self, task_id: str) -> bytes:
        """One MATCH pattern covering all four namespaces of ``task_id``.

        It may match more than the task's keys (``other:task:x``); callers keep only
        keys that start with one of :meth:`task_prefixes`.
        """
        part = self._task_part(validate_task_id(task_id)).encode()
        return escape_glob(self.prefix.encode()) + b"*:" + escape_glob(part) + b":*"

    def role_of(self, task_id: str, key: bytes) -> str | None:
        """The role of ``key`` if it belongs to ``task_id``, else ``None``."""
        for role in ROLES:
            if key.startswith(self.task_prefix(role, task_id)):
                return role
        return None

    def task_of(self, key: bytes) -> str | None:
        """The task id a key belongs to under this layout, or ``None``."""
        prefix = self.prefix.encode()
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix) :]
        for namespace in self.namespaces():
            head = namespace.encode() + b":"
            if not rest.startswith(head):
                continue
            tail = rest[len(head) :]
            if self.cluster:
                if not tail.startswith(b"{"):
                    return None
                end = tail.find(b"}:")
                candidate = tail[1:end] if end > 0 else b""
            else:
                candidate = tail.split(b":", 1)[0] if b":" in tail else b""
            try:
                return validate_task_id(candidate.decode())
            except (ValidationError, UnicodeDecodeError):
                return None
        return None
