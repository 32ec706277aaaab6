"""CheckpointManager: consistent checkpoints of a task across Redis and the durable store.

create:  validate id -> lock task -> read runtime keys (atomic) -> read durable rows
         -> canonical encoding -> content hash -> same as newest usable? return it
         -> store new payloads + catalog row ``completed`` in ONE transaction -> unlock
recover: lock task -> choose checkpoint (given, else newest intact usable) -> verify
         -> durable rows replaced and the recovery recorded in one transaction, around an
            atomic replacement of the runtime keys -> unlock
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from .codec import (
    Payload,
    decode_tables,
    decompress_verified,
    encode_tables,
    state_hashes,
)
from .config import durable_url_from_env, redis_url_from_env
from .contents import CheckpointContents, verify_contents
from .diff import RecoveryPlan, StateDiff, diff_keys, diff_rows, diff_states, ttl_moves
from .durable.schema import SKILL_TABLE
from .durable.sql import CleanupResult, SqlStore, utcnow
from .durable.sqlite import SqliteStore
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StoreUnavailableError,
    UnreadableFormatError,
    ValidationError,
)
from .image import (
    Keyframe,
    KeyIndex,
    RuntimeImage,
    Snapshot,
    delta_payloads,
    expiries_moved,
    gc_paused,
    keyframe_payloads,
)
from .layout import KeyLayout, validate_checkpoint_id, validate_task_id
from .memo import CaptureMemo
from .model import (
    FORMAT_VERSION,
    USABLE_STATUSES,
    CheckpointConfig,
    CheckpointMetadata,
    CheckpointStatus,
    CheckpointTrigger,
    DurableSnapshot,
    RecoveryResult,
    RuntimeEntry,
    TableRows,
    TaskState,
    TaskSummary,
)
from .pieces import Pieces
from .runtime.connection import is_cluster_url
from .runtime.embedded import EmbeddedRedis
from .runtime.lock import TaskLock
from .runtime.redis_runtime import RedisRuntime, connect, redact_url
from .runtime.writer import TaskWriter
from .scheduler import Listener, PeriodicCheckpointer
from .stream import check_streamed, create_streamed, restore_streamed, streamable
from .transfer import read_export, write_export


def open_store(durable_url: str) -> SqlStore:
    """The durable store a URL names: ``sqlite:///path`` or ``postgresql://...``."""
    scheme = durable_url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        return SqliteStore.from_url(durable_url)
    if scheme in ("postgres", "postgresql"):
        from .durable.postgres import PostgresStore  # psycopg is loaded only when used

        return PostgresStore.from_url(durable_url)
    raise ValidationError(
        f"unsupported durable URL {redact_url(durable_url)!r}: expected sqlite:///path/to/file.db "
        "or postgresql://user@host:port/dbname"
    )


def _trigger(value: CheckpointTrigger | str) -> CheckpointTrigger:
    try:
        return CheckpointTrigger(value)
    except ValueError:
        names = ", ".join(t.value for t in CheckpointTrigger)
        raise ValidationError(f"unknown trigger {value!r}; expected one of {names}") from None


def _metadata(value: Mapping[str, Any] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValidationError(f"metadata must be a mapping, not {type(value).__name__}")
    try:
        return dict(json.loads(json.dumps(dict(value), sort_keys=True, allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"metadata must be JSON-serializable: {exc}") from exc


#: The metadata entry of a checkpoint whose runtime keys were read one Redis Cluster slot
#: at a time (the reference layout on a cluster): its ``point_in_time`` is False.
NODE_BY_NODE = {"runtime_capture": "node_by_node"}


def _capture_note(node_by_node: bool) -> dict[str, Any]:
    return dict(NODE_BY_NODE) if node_by_node else {}


#: How many verified payload digests a manager remembers.
_VERIFIED_CACHE = 200_000
#: For how many tasks a manager remembers the newest checkpoint's keyframe and key index.
_KNOWN_TASKS = 256


@dataclass(frozen=True, slots=True)
class _Streamed:
    """A large checkpoint verified for a recovery that streams it back."""

    meta: CheckpointMetadata
    manifest: list[tuple[str, str]]
    #: Its DUMP entries, checked against the target server before anything is written.
    dumps: list[RuntimeEntry]


@dataclass(frozen=True, slots=True)
class _KnownState:
    """What the next checkpoint of a task is compared with and stored against."""

    checkpoint_id: str
    keyframe: Keyframe
    current: KeyIndex


class _Plan(NamedTuple):
    """A checkpoint to store: its row, its payloads (``(kind, digest, payload or None)``:
    None for one the keyframe already stored) and what the next one compares with."""

    meta: CheckpointMetadata
    parts: list[tuple[str, str, Payload | None]]
    keyframe: Keyframe
    current: KeyIndex


class CheckpointManager:
    """Creates, lists, recovers and cleans up checkpoints of tasks."""

    def __init__(
        self,
        runtime: RedisRuntime | Callable[[], tuple[RedisRuntime, EmbeddedRedis | None]],
        store: SqlStore,
        *,
        config: CheckpointConfig | None = None,
        embedded: EmbeddedRedis | None = None,
        layout: KeyLayout | None = None,
    ) -> None:
        """``runtime`` is a connected :class:`RedisRuntime`, or a function that connects
        one (and maybe starts an embedded server) the first time Redis is needed."""
        if isinstance(runtime, RedisRuntime):
            layout = runtime.layout
            self._runtime: RedisRuntime | None = runtime
            self._connect: Callable[[], tuple[RedisRuntime, EmbeddedRedis | None]] | None = None
        else:
            self._runtime, self._connect = None, runtime
        #: The key layout of the tasks (the runtime's, once connected).
        self.layout = layout or KeyLayout()
        self.store = store
        self.config = config or CheckpointConfig()
        self._embedded = embedded
        self._last_cleanup = time.monotonic()
        self._schedulers: list[PeriodicCheckpointer] = []
        #: Payload digests this manager wrote or verified, most recent last (bounded).
        self._verified: OrderedDict[str, None] = OrderedDict()
        #: Per task, the newest checkpoint's keyframe and key index (bounded).
        self._known: OrderedDict[str, _KnownState] = OrderedDict()
        #: Per task, the capture that matched its newest checkpoint (bounded in bytes).
        self._memo = CaptureMemo(self.config.capture_memo_bytes)

    @property
    def runtime(self) -> RedisRuntime:
        """The runtime tier (Redis), connected on first use when opened lazily."""
        if self._runtime is None:
            if self._connect is None:
                raise StoreUnavailableError("this manager has no runtime tier")
            self._runtime, self._embedded = self._connect()
            self._connect = None
        return self._runtime

    @classmethod
    def open(
        cls,
        redis_url: str | None = None,
        durable_url: str | None = None,
        *,
        layout: KeyLayout | None = None,
        config: CheckpointConfig | None = None,
        redis_binary: str | None = None,
        lazy_runtime: bool = False,
    ) -> CheckpointManager:
        """Connect to both tiers.

        ``redis_url`` defaults to ``CFN_REDIS_URL`` (or ``CFN_REDIS_HOST``/``CFN_REDIS_PORT``);
        with none, an embedded ``redis-server`` is started for this process. A
        ``redis+cluster://host:port`` (or ``rediss+cluster://``) URL names a Redis Cluster
        by one of its nodes; ``layout`` then defaults to the cluster layout (the task
        in a hash tag, so each task's keys share one slot and are read atomically).
        ``durable_url`` defaults to ``CFN_DURABLE_URL``, else ``sqlite:///cfn-checkpoint.db``.
        With ``lazy_runtime`` Redis is connected (or the embedded one started) only when
        something needs it, so work on the stored checkpoints alone (list, show,
        verify, export, import, cleanup) goes on while Redis is down.
        """
        redis_url = redis_url or redis_url_from_env()
        durable_url = durable_url or durable_url_from_env()
        config = config or CheckpointConfig()
        if layout is None and redis_url is not None and is_cluster_url(redis_url):
            layout = KeyLayout(cluster=True)

        def connect_runtime() -> tuple[RedisRuntime, EmbeddedRedis | None]:
            embedded = None
            url = redis_url
            try:
                if url is None:
                    embedded = EmbeddedRedis(binary=redis_binary).start()
                    url = embedded.url
                client = connect(url)
            except BaseException:
                if embedded is not None:
                    embedded.stop()
                raise
            runtime = RedisRuntime(
                client,
                layout=layout,
                scan_in_script_max_keys=config.scan_in_script_max_keys,
                exact_scan_max_keys=config.exact_scan_max_keys,
            )
            return runtime, embedded

        if lazy_runtime:
            return cls(connect_runtime, open_store(durable_url), config=config, layout=layout)
        runtime, embedded = connect_runtime()
        try:
            # Redis first: an unreachable server leaves no new database file behind.
            store = open_store(durable_url)
        except BaseException:
            runtime.close()
            if embedded is not None:
                embedded.stop()
            raise
        return cls(runtime, store, config=config, embedded=embedded)

    def close(self) -> None:
        """Stop periodic checkpoints, close both tiers, stop an embedded Redis it started."""
        for scheduler in self._schedulers:
            scheduler.stop()
        if self._runtime is not None:
            self._runtime.close()
        self.store.close()
        if self._embedded is not None:
            self._embedded.stop()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- writing task state ------------------------------------------------------------------

    def writer(self, task_id: str) -> TaskWriter:
        """A writer for the task's runtime state (agents, signals, queues, locks)."""
        return TaskWriter(self.runtime.client, task_id, layout=self.runtime.layout)

    @property
    def durable(self) -> SqlStore:
        """The durable store, for recording task results, metrics, audit events, skills."""
        return self.store

    @contextmanager
    def _task_lock(self, task_id: str) -> Iterator[TaskLock]:
        with TaskLock(
            self.runtime.client,
            task_id,
            prefix=self.runtime.layout.prefix,
            timeout=self.config.lock_timeout,
        ) as lock:
            yield lock

    # -- create ------------------------------------------------------------------------------

    def create_checkpoint(
        self,
        task_id: str,
        trigger: CheckpointTrigger | str = CheckpointTrigger.MANUAL,
        metadata: Mapping[str, Any] | None = None,
    ) -> CheckpointMetadata:
        """Checkpoint the task's runtime keys and durable rows.

        Returns the new checkpoint, or the newest existing one when nothing changed
        since it (TTLs ticking down do not count as change).
        """
        task_id = validate_task_id(task_id)
        trigger = _trigger(trigger)
        extra = _metadata(metadata)
        with self._task_lock(task_id) as lock:
            meta = self._create(task_id, trigger, extra, lock)
        self._maybe_cleanup()
        return meta

    def _create(
        self, task_id: str, trigger: CheckpointTrigger, extra: dict[str, Any], lock: TaskLock
    ) -> CheckpointMetadata:
        started = utcnow()
        checkpoint_id = f"cp_{task_id}_{started:%Y%m%dT%H%M%S%f}_{secrets.token_hex(3)}"
        cfg = self.config
        newest = self._newest_usable(task_id)
        if (newest is None or newest.key_count > cfg.stream_min_keys) and (
            self.runtime.dbsize() > cfg.stream_min_keys
        ):
            keys = self.runtime.task_keys(task_id)
            if len(keys) > cfg.stream_min_keys:
                draft = CheckpointMetadata(
                    checkpoint_id=checkpoint_id,
                    task_id=task_id,
                    trigger=trigger,
                    status=CheckpointStatus.IN_PROGRESS,
                    state_hash="",
                    runtime_state_hash="",
                    durable_state_hash="",
                    created_at=started,
                    metadata={**extra, **_capture_note(not self.runtime.point_in_time)},
                )
                lock.check()
                return create_streamed(self, draft, keys, newest)
        known = self._known_state(task_id, newest)
        with gc_paused():
            # An unchanged reply is swapped for the equal one kept before the collector
            # resumes (and would walk it: 15-20 ms at 100,000 keys). Only Redis is
            # waited on meanwhile: a few calls, each bounded by the command timeout.
            expected, batch_raw = None, False
            if newest is not None and known is not None:
                expected = self._memo.expected(task_id, newest.checkpoint_id)
                batch_raw = self._memo.wants_bytes(task_id, newest.checkpoint_id)
            snapshot = self._capture(task_id, newest, expected, batch_raw)
            unchanged = (
                newest is not None
                and known is not None
                and self._memo.matches(task_id, newest.checkpoint_id, snapshot)
            )
        durable = self.store.read_durable(task_id)
        if not snapshot.has_keys and not durable.row_count:
            raise CheckpointNotFoundError(
                f"task {task_id} has no runtime keys and no durable rows: nothing to checkpoint"
            )
        if (
            trigger is CheckpointTrigger.PERIODIC
            and not snapshot.has_keys
            and newest is not None
            and newest.key_count
        ):
            # A periodic checkpoint would record the loss as the newest state, and a
            # plain recover would then restore nothing. Someone must decide.
            raise ValidationError(
                f"task {task_id} has lost its runtime keys (its newest checkpoint has "
                f"{newest.key_count}): not checkpointing over them; recover the task, or "
                "take a manual checkpoint if the loss is intended"
            )
        with gc_paused():
            # Rows, digests and payloads are made (a few objects a key) with the collector
            # paused, and what is not kept is freed before it resumes: otherwise each
            # collection walks them all (70-80 ms of a 1.08 s create at 100,000 keys). The
            # pause ends before the store is written: it is process-wide, and a commit
            # can wait on another writer for seconds.
            planned = self._plan(
                task_id,
                trigger,
                extra,
                checkpoint_id=checkpoint_id,
                started=started,
                newest=newest,
                known=known,
                snapshot=snapshot,
                unchanged=unchanged,
                durable=durable,
            )
        if isinstance(planned, CheckpointMetadata):
            return planned  # unchanged, and intact
        meta, parts, keyframe, current = planned
        manifest = [(kind, digest) for kind, digest, _ in parts]
        # Payloads this manager wrote or verified are not sent again (the store has
        # them); if one has gone meanwhile the commit fails rather than guess. Keyframe
        # chunks come compressed (named by their stored bytes); the rest is compressed
        # here, unless the store has it.
        level = cfg.compression_level

        def commit() -> CheckpointMetadata:
            blobs = {
                digest: (len(p.raw), p.to_store(level))
                for _, digest, p in parts
                if p is not None and digest not in self._verified
            }
            return self.store.commit_checkpoint(
                meta,
                manifest,
                blobs,
                unless_same=newest is None or newest.state_hash != meta.state_hash,
                trusted=self._verified,
            )

        lock.check()
        try:
            try:
                done = commit()
            except CorruptCheckpointError:
                # A payload trusted here was removed since (a cleanup, by this manager or
                # another worker): trust none of this checkpoint's, send what we hold.
                for _, digest in manifest:
                    self._verified.pop(digest, None)
                done = commit()
        except CheckpointError as exc:
            self._record_failure(meta, exc)
            raise
        self._trust(d for _, d in manifest)
        self._remember(task_id, _KnownState(done.checkpoint_id, keyframe, current))
        if done.checkpoint_id == meta.checkpoint_id:
            self._memo.keep(task_id, done.checkpoint_id, snapshot)
        return done

    def _plan(
        self,
        task_id: str,
        trigger: CheckpointTrigger,
        extra: dict[str, Any],
        *,
        checkpoint_id: str,
        started: datetime,
        newest: CheckpointMetadata | None,
        known: _KnownState | None,
        snapshot: Snapshot,
        unchanged: bool,
        durable: DurableSnapshot,
    ) -> CheckpointMetadata | _Plan:
        """The newest checkpoint if nothing changed since it, else what to store.
        ``unchanged``: ``snapshot`` read exactly as the newest checkpoint's capture."""
        durable_payload = encode_tables("durable", durable.tables)
        skills_payload = encode_tables("skills", {SKILL_TABLE: durable.skills})
        if unchanged and newest is not None:
            # Read exactly as last time (values and expiry instants alike): the runtime
            # state is the newest checkpoint's, and nothing needs packing or hashing.
            same = state_hashes(
                newest.runtime_state_hash, durable_payload.digest, skills_payload.digest
            )
            if same[0] == newest.state_hash:
                return newest
        image = RuntimeImage.of(snapshot)
        runtime_hash = image.runtime_hash()
        state_hash, durable_hash = state_hashes(
            runtime_hash, durable_payload.digest, skills_payload.digest
        )
        if (
            newest is not None
            and known is not None
            and newest.state_hash == state_hash
            and not expiries_moved(known.current, image)
        ):
            self._memo.keep(task_id, newest.checkpoint_id, snapshot)
            return newest  # TTLs ticking down do not count as change
        runtime = delta_payloads(image, known.keyframe) if known is not None else []
        keyframe = known.keyframe if runtime and known is not None else None
        if keyframe is None:
            frame_payloads, keyframe = keyframe_payloads(image, self.config.compression_level)
            runtime = [(p.kind, p.digest, p) for p in frame_payloads]
        parts = [*runtime]
        parts += [("durable", durable_payload.digest, durable_payload)]
        parts += [("skills", skills_payload.digest, skills_payload)]
        meta = CheckpointMetadata(
            checkpoint_id=checkpoint_id,
            task_id=task_id,
            trigger=trigger,
            status=CheckpointStatus.COMPLETED,
            state_hash=state_hash,
            runtime_state_hash=runtime_hash,
            durable_state_hash=durable_hash,
            created_at=started,
            completed_at=utcnow(),
            metadata={**extra, **_capture_note(snapshot.node_by_node)},
            key_count=len(snapshot.packed.keys),
            row_count=durable.row_count,
            raw_bytes=snapshot.row_bytes + len(durable_payload.raw) + len(skills_payload.raw),
            point_in_time=snapshot.point_in_time,
            redis_version=self.runtime.version(),  # not asked when nothing changed
        )
        return _Plan(meta, parts, keyframe, image.index())

    def _capture(
        self,
        task_id: str,
        newest: CheckpointMetadata | None,
        expected: tuple[Pieces, ...] | None = None,
        batch_raw: bool = False,
    ) -> Snapshot:
        """The task's keys read; as bytes too when the memo may keep them (in batches
        only with ``batch_raw``), and compared with ``expected`` (the bytes kept for
        ``newest``) before they are parsed."""
        cfg = self.config
        return self.runtime.capture(
            task_id,
            atomic_max_keys=cfg.atomic_max_keys,
            batch_keys=cfg.batch_keys,
            expected_keys=newest.key_count if newest is not None else 0,
            raw=self._memo.max_bytes > 0,
            batch_raw=batch_raw,
            expected=expected,
        )

    def _known_state(self, task_id: str, newest: CheckpointMetadata | None) -> _KnownState | None:
        """The newest checkpoint's keyframe and key index, if it is intact.

        From memory when this manager wrote or read it last (its payloads then known
        good); otherwise it is loaded and verified once. ``None`` when there is no
        newest checkpoint or it is damaged: the next checkpoint is then a full
        keyframe, whose intact payloads repair the damaged ones they share. Also
        ``None`` for a checkpoint of an older storage format: its row digests are not
        comparable with this format's.
        """
        if newest is None or newest.format_version != FORMAT_VERSION:
            return None
        cached = self._known.get(task_id)
        try:
            manifest = self.store.manifest(newest.checkpoint_id)
            self._verify_payloads(manifest)
            if cached is not None and cached.checkpoint_id == newest.checkpoint_id:
                self._known.move_to_end(task_id)
                return cached
            contents = self._load(newest)
        except CorruptCheckpointError:
            return None
        known = _KnownState(newest.checkpoint_id, contents.keyframe, contents.current)
        self._remember(task_id, known)
        return known

    def _remember(self, task_id: str, known: _KnownState) -> None:
        self._known[task_id] = known
        self._known.move_to_end(task_id)
        while len(self._known) > _KNOWN_TASKS:
            self._known.popitem(last=False)

    def _verify_payloads(self, manifest: list[tuple[str, str]]) -> None:
        """Check payloads this manager has not checked or written yet; raise if corrupt."""
        unknown = [d for _, d in manifest if d not in self._verified]
        stored = self.store.load_payloads(unknown)
        for digest in unknown:
            if digest not in stored:
                raise CorruptCheckpointError(f"payload {digest[:12]} is missing")
            decompress_verified(digest, stored[digest])
        self._trust(unknown)

    def _trust(self, digests: Iterable[str]) -> None:
        for digest in digests:
            self._verified[digest] = None
            self._verified.move_to_end(digest)
        while len(self._verified) > _VERIFIED_CACHE:
            self._verified.popitem(last=False)

    def _record_failure(self, meta: CheckpointMetadata, exc: Exception) -> None:
        failed = replace(meta, status=CheckpointStatus.FAILED, completed_at=None, error=str(exc))
        try:
            self.store.record_failure(failed)
        except CheckpointError:
            pass  # the store itself is failing; the original error is what matters

    def _newest_usable(self, task_id: str) -> CheckpointMetadata | None:
        found = self.store.usable_checkpoints(task_id)
        return found[0] if found else None

    # -- read --------------------------------------------------------------------------------

    def list_checkpoints(
        self,
        task_id: str | None = None,
        *,
        status: CheckpointStatus | str | None = None,
        limit: int | None = None,
    ) -> list[CheckpointMetadata]:
        """Checkpoints, newest first; of one task and one status when given."""
        if task_id is not None:
            validate_task_id(task_id)
        if status is not None:
            try:
                status = CheckpointStatus(status)
            except ValueError:
                names = ", ".join(s.value for s in CheckpointStatus)
                raise ValidationError(
                    f"unknown status {status!r}; expected one of {names}"
                ) from None
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise ValidationError(f"limit must be a whole number, not {limit!r}")
        if limit is not None and limit < 1:
            raise ValidationError(f"limit must be at least 1, not {limit}")
        return self.store.list_checkpoints(task_id, status=status, limit=limit)

    def get_checkpoint(self, checkpoint_id: str) -> CheckpointMetadata:
        """One checkpoint's metadata; ``CheckpointNotFoundError`` if there is none."""
        meta = self.store.get_checkpoint(checkpoint_id)
        if meta is None:
            raise CheckpointNotFoundError(f"no checkpoint with id {checkpoint_id!r}")
        return meta

    def load_checkpoint(self, checkpoint_id: str) -> CheckpointContents:
        """A checkpoint's contents, verified against every hash it carries."""
        return self._load(self.get_checkpoint(checkpoint_id))

    def _load(self, meta: CheckpointMetadata, *, skills: bool = True) -> CheckpointContents:
        # One read transaction: a cleanup in between cannot make it look corrupt.
        with self.store.reading():
            manifest = self.store.manifest(meta.checkpoint_id)
            if not manifest and self.store.get_checkpoint(meta.checkpoint_id) is None:
                raise CheckpointNotFoundError(f"no checkpoint with id {meta.checkpoint_id!r}")
            wanted = [d for kind, d in manifest if skills or kind != "skills"]
            stored = self.store.load_payloads(wanted)
        contents = verify_contents(meta, manifest, stored, skills=skills)
        self._trust(wanted)
        return contents

    def verify_checkpoint(self, checkpoint_id: str) -> CheckpointMetadata:
        """Check every payload of a checkpoint against its hashes; raise if corrupt."""
        return self.load_checkpoint(checkpoint_id).meta

    def verify_all(
        self, task_id: str | None = None
    ) -> list[tuple[CheckpointMetadata, CorruptCheckpointError | None]]:
        """Verify every completed or recovered checkpoint (of one task, if given)."""
        results: list[tuple[CheckpointMetadata, CorruptCheckpointError | None]] = []
        for meta in self.list_checkpoints(task_id):
            if meta.status not in USABLE_STATUSES:
                continue
            try:
                self._load(meta)
            except CorruptCheckpointError as exc:
                results.append((meta, exc))
            else:
                results.append((meta, None))
        return results

    # -- inspect -----------------------------------------------------------------------------

    def live_state(self, task_id: str) -> TaskState:
        """The task as it is now in both tiers (read like a checkpoint, stored nowhere)."""
        task_id = validate_task_id(task_id)
        cfg = self.config
        snapshot = self.runtime.capture(
            task_id, atomic_max_keys=cfg.atomic_max_keys, batch_keys=cfg.batch_keys
        )
        durable = self.store.read_durable(task_id)
        return TaskState(task_id, snapshot.entries, snapshot.captured_at_ms, durable.tables)

    def restorable_state(self, contents: CheckpointContents) -> tuple[TaskState, list[bytes]]:
        """What recovering ``contents`` now would produce, and the keys the TTL policy
        leaves out because their TTL has run out."""
        writes, lapsed = self.runtime.plan_ttls(
            contents.meta.task_id,
            contents.entries,
            contents.captured_at_ms,
            self.config.ttl_policy,
        )
        entries = [e._replace(pttl_ms=None if ttl < 0 else ttl) for e, ttl in writes]
        state = TaskState(contents.meta.task_id, entries, contents.captured_at_ms, contents.tables)
        return state, [e.key for e in lapsed]

    def diff(self, old_checkpoint_id: str, new_checkpoint_id: str | None = None) -> StateDiff:
        """Keys and rows added, removed and changed from one checkpoint to another.

        Without ``new_checkpoint_id`` the checkpoint is compared with the task as it is
        now, taking the checkpoint as a recovery would restore it now (keys whose TTL
        has run out under the TTL policy left out): right after a recovery from it,
        the diff is empty.
        """
        old = self.load_checkpoint(old_checkpoint_id)
        if new_checkpoint_id is None:
            with self._task_lock(old.meta.task_id):
                restorable, _ = self.restorable_state(old)
                live = self.live_state(old.meta.task_id)
            return diff_states(restorable.entries, restorable.tables, live.entries, live.tables)
        new = self.load_checkpoint(new_checkpoint_id)
        return diff_states(old.entries, old.tables, new.entries, new.tables)

    def plan_recovery(
        self,
        task_id: str,
        checkpoint_id: str | None = None,
        *,
        restore_runtime: bool = True,
        restore_durable: bool = False,
    ) -> RecoveryPlan:
        """Exactly what :meth:`recover_from_checkpoint` would change now; changes nothing."""
        task_id = validate_task_id(task_id)
        if not (restore_runtime or restore_durable):
            raise ValidationError("nothing to recover: both runtime and durable tiers are off")
        with self._task_lock(task_id):
            chosen, notes = self._choose(task_id, checkpoint_id)
            assert isinstance(chosen, CheckpointContents)  # not streamed: plans are in memory
            contents = chosen
            self._check_owned(contents)
            restorable, lapsed = self.restorable_state(contents)
            live = self.live_state(task_id)
        keys = diff_keys(live.entries, restorable.entries) if restore_runtime else []
        if restore_runtime:
            keys = sorted(keys + ttl_moves(live.entries, restorable.entries), key=lambda c: c.key)
        rows = diff_rows(live.tables, restorable.tables) if restore_durable else []
        return RecoveryPlan(
            contents.meta, StateDiff(keys, rows), lapsed if restore_runtime else [], notes
        )

    def tasks(self) -> list[TaskSummary]:
        """Every task with checkpoints or live runtime keys, by task id."""
        overview = self.store.task_overview()
        live = self.runtime.task_key_counts()
        return [
            TaskSummary(
                task_id=task,
                live_keys=live.get(task, 0),
                checkpoints=overview.get(task, (0, None))[0],
                newest=overview.get(task, (0, None))[1],
            )
            for task in sorted(overview.keys() | live.keys())
        ]

    # -- export and import -------------------------------------------------------------------

    def export_checkpoint(self, checkpoint_id: str, path: str | Path) -> int:
        """Write one verified checkpoint to a portable file; returns its size in bytes.

        The file is written beside its destination and renamed into place, so a
        failed export leaves no partial file.
        """
        contents = self.load_checkpoint(checkpoint_id)
        manifest = self.store.manifest(checkpoint_id)
        stored = self.store.load_stored(d for _, d in manifest)
        target = Path(path)
        partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
        try:
            with partial.open("wb") as out:
                size = write_export(out, contents.meta, manifest, stored)
            partial.replace(target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise ValidationError(f"cannot write export file {target}: {exc.strerror}") from exc
        return size

    def import_checkpoint(self, path: str | Path) -> CheckpointMetadata:
        """Add a checkpoint from an export file, verified in full before anything is stored."""
        contents, manifest, stored = read_export(Path(path))
        try:
            validate_task_id(contents.meta.task_id)
            validate_checkpoint_id(contents.meta.checkpoint_id)
        except ValidationError as exc:
            raise ValidationError(f"export file {path} is not usable here: {exc}") from exc
        self._check_owned(contents)
        return self.store.import_checkpoint(contents.meta, manifest, stored)

    def _check_owned(self, contents: CheckpointContents) -> None:
        """Refuse a checkpoint holding keys that are not its task's under this layout."""
        task = contents.meta.task_id
        other = replace(self.layout, cluster=not self.layout.cluster)
        for entry in contents.entries:
            if self.layout.role_of(task, entry.key) is None:
                hint = ""
                if other.role_of(task, entry.key) is not None:
                    name = "cluster" if other.cluster else "reference"
                    hint = (
                        f"; it was taken under the {name} key layout: use --key-layout "
                        f"{name} (KeyLayout(cluster={other.cluster}))"
                    )
                raise ValidationError(
                    f"checkpoint {contents.meta.checkpoint_id} holds key {entry.key!r}, which "
                    f"is not a key of task {task} under this key layout (prefix "
                    f"{self.layout.prefix!r}){hint}"
                )

    # -- periodic ----------------------------------------------------------------------------

    def enable_periodic_checkpoints(
        self,
        *,
        interval: timedelta | None = None,
        tasks: list[str] | None = None,
        on_outcome: Listener | None = None,
    ) -> PeriodicCheckpointer:
        """Start periodic checkpoints (trigger ``periodic``) in a background thread.

        Every ``interval`` (default: ``config.periodic_interval``) each given task, or
        every task with runtime keys, is checkpointed (an unchanged task stores
        nothing), then retention cleanup runs if enabled. Call ``stop()`` on the
        result to end it; :meth:`close` stops it too.
        """
        scheduler = PeriodicCheckpointer(
            self, interval=interval, tasks=tasks, on_outcome=on_outcome
        ).start()
        self._schedulers.append(scheduler)
        return scheduler

    # -- recover -----------------------------------------------------------------------------

    def recover_from_checkpoint(
        self,
        task_id: str,
        checkpoint_id: str | None = None,
        *,
        restore_runtime: bool = True,
        restore_durable: bool = False,
    ) -> RecoveryResult:
        """Put the task back as it was at a checkpoint.

        Without ``checkpoint_id`` the newest intact usable checkpoint is used: corrupt
        ones are skipped and named in ``errors``. The runtime keys are replaced
        atomically (keys created since are removed); with ``restore_durable`` the task's
        durable rows are replaced in the same transaction that records the recovery.
        """
        task_id = validate_task_id(task_id)
        if not (restore_runtime or restore_durable):
            raise ValidationError("nothing to recover: both runtime and durable tiers are off")
        with self._task_lock(task_id):
            loaded, notes = self._choose(task_id, checkpoint_id, streamed=True)
            return self._restore(loaded, notes, restore_runtime, restore_durable)

    def _choose(
        self, task_id: str, checkpoint_id: str | None, *, streamed: bool = False
    ) -> tuple[CheckpointContents | _Streamed, list[str]]:
        if checkpoint_id is not None:
            meta = self.get_checkpoint(checkpoint_id)
            if meta.task_id != task_id:
                raise ValidationError(
                    f"checkpoint {checkpoint_id} belongs to task {meta.task_id}, not {task_id}"
                )
            if meta.status not in USABLE_STATUSES:
                raise ValidationError(
                    f"checkpoint {checkpoint_id} is {meta.status.value}; it cannot be recovered"
                )
            return self._load_for_recovery(meta, streamed), []
        candidates = self.store.usable_checkpoints(task_id)
        if not candidates:
            raise CheckpointNotFoundError(f"task {task_id} has no completed checkpoint")
        notes: list[str] = []
        for meta in candidates:
            try:
                loaded = self._load_for_recovery(meta, streamed)
            except UnreadableFormatError as exc:
                # Written by a newer version, not damaged: an older checkpoint in its
                # place would silently roll the task further back than asked.
                raise UnreadableFormatError(
                    f"{exc}: not recovering an older checkpoint in its place; upgrade "
                    "cfn-checkpoint, or name the checkpoint to recover"
                ) from exc
            except CorruptCheckpointError as exc:
                notes.append(f"skipped corrupt checkpoint {meta.checkpoint_id}: {exc}")
                continue
            if notes:
                notes.append(f"fell back to checkpoint {meta.checkpoint_id}")
            return loaded, notes
        raise CorruptCheckpointError(
            f"every checkpoint of task {task_id} is corrupt; " + "; ".join(notes)
        )

    def _load_for_recovery(
        self, meta: CheckpointMetadata, streamed: bool
    ) -> CheckpointContents | _Streamed:
        """A checkpoint verified for recovery: in memory, or (a large keyframe, when the
        caller can stream) verified in one pass and written back chunk by chunk."""
        if streamed and meta.key_count > self.config.stream_min_keys:
            with self.store.reading():
                manifest = self.store.manifest(meta.checkpoint_id)
            if streamable(manifest):
                checked, dumps = check_streamed(self, meta)
                return _Streamed(meta, checked, dumps)
        return self._load(meta, skills=False)

    def _restore(
        self, loaded: CheckpointContents | _Streamed, notes: list[str], runtime: bool, durable: bool
    ) -> RecoveryResult:
        meta = loaded.meta
        result = RecoveryResult(
            success=False,
            checkpoint_id=meta.checkpoint_id,
            task_id=meta.task_id,
            runtime_state_restored=False,
            durable_state_restored=False,
            errors=notes,
        )
        interrupted = self.store.interrupted_recoveries(meta.task_id)
        for _, checkpoint_id, started_at in interrupted:
            notes.append(
                f"an earlier recovery from {checkpoint_id} (started {started_at}) never "
                "finished: the task may have been left partly restored until now"
            )
        # Committed before anything is written: a crash from here on leaves a trace.
        recovery = self.store.start_recovery(
            meta.checkpoint_id, meta.task_id, runtime=runtime, durable=durable
        )
        try:
            if durable:
                # The durable rows are replaced in a transaction that stays open around
                # the runtime restore: an error in either leaves both as they were.
                with self.store.atomic() as db:
                    result.rows_restored = self.store.replace_task_rows(
                        db, meta.task_id, self._tables_of(loaded)
                    )
                    result.durable_state_restored = True
                    if runtime:
                        self._restore_runtime(loaded, result)
                    self._finish(db, recovery, result, [i for i, _, _ in interrupted])
            else:
                # Runtime only: no durable transaction is held while Redis is written, so
                # other tasks' creates and recoveries on the same store are not held up.
                self._restore_runtime(loaded, result)
        except BaseException as exc:
            with suppress(CheckpointError):
                self.store.fail_recovery(recovery, str(exc) or type(exc).__name__)
            raise
        if not durable:
            try:
                with self.store.atomic() as db:
                    self._finish(db, recovery, result, [i for i, _, _ in interrupted])
            except CheckpointError as exc:
                # The task is back; only the bookkeeping failed. Say so rather than
                # report a failure for a recovery that took place.
                notes.append(f"recovery succeeded but could not be recorded: {exc}")
        result.success = True
        return result

    def _finish(
        self, db: Any, recovery: int, result: RecoveryResult, interrupted: list[int]
    ) -> None:
        self.store.close_interrupted(db, interrupted)
        self.store.finish_recovery(
            db,
            recovery,
            result.checkpoint_id,
            task_id=result.task_id,
            keys=result.keys_restored,
            rows=result.rows_restored,
            notes="; ".join(result.errors) or None,
        )

    def _tables_of(self, loaded: CheckpointContents | _Streamed) -> dict[str, TableRows]:
        if isinstance(loaded, CheckpointContents):
            return loaded.tables
        (digest,) = [d for k, d in loaded.manifest if k == "durable"]
        raw = decompress_verified(digest, self.store.load_payloads([digest])[digest])
        return decode_tables(digest, raw)

    def _restore_runtime(
        self, loaded: CheckpointContents | _Streamed, result: RecoveryResult
    ) -> None:
        if isinstance(loaded, _Streamed):
            written, removed, expired = restore_streamed(
                self, loaded.meta, loaded.manifest, loaded.dumps
            )
            result.runtime_state_restored = True
            result.keys_restored, result.keys_removed = written, removed
            result.keys_expired, result.atomic = expired, False
            return
        cfg = self.config
        stats = self.runtime.restore(
            loaded.meta.task_id,
            loaded.rows,
            loaded.captured_at_ms,
            ttl_policy=cfg.ttl_policy,
            atomic_max_keys=cfg.atomic_max_keys,
            batch_keys=cfg.batch_keys,
        )
        result.runtime_state_restored = True
        result.keys_restored = stats.keys_written
        result.keys_removed = stats.keys_removed
        result.keys_expired = stats.keys_expired
        result.atomic = stats.atomic

    # -- retention ---------------------------------------------------------------------------

    def cleanup_old_checkpoints(
        self, *, older_than: timedelta | None = None, keep_last: int = 1
    ) -> int:
        """Remove checkpoints older than the retention period (or ``older_than``).

        A task's newest usable checkpoint is always kept (``keep_last`` of them), and
        payloads no remaining checkpoint references are deleted. Returns the number of
        checkpoints removed.
        """
        return len(self.cleanup(older_than=older_than, keep_last=keep_last).checkpoint_ids)

    def cleanup(
        self, *, older_than: timedelta | None = None, keep_last: int = 1, dry_run: bool = False
    ) -> CleanupResult:
        """Like :meth:`cleanup_old_checkpoints`, returning what was removed: checkpoint
        ids, payloads and bytes. With ``dry_run`` nothing is removed; the result says
        what would be."""
        age = self.config.retention_period if older_than is None else older_than
        if not isinstance(age, timedelta):
            raise ValidationError(f"older_than must be a timedelta, not {age!r}")
        if age < timedelta(0):
            raise ValidationError(f"older_than must not be negative, not {age}")
        if keep_last < 1:
            raise ValidationError(f"keep_last must be at least 1, not {keep_last}")
        # The newest checkpoint is kept anyway; if it is damaged, so is the newest intact
        # one, which recovery would fall back to.
        protect = {
            intact
            for task in self.store.task_overview()
            if (intact := self._newest_intact(task)) is not None
        }
        result = self.store.cleanup(
            utcnow() - age, keep_last=keep_last, dry_run=dry_run, protect=protect
        )
        if not dry_run:
            self._last_cleanup = time.monotonic()
        return result

    def _newest_intact(self, task_id: str) -> str | None:
        for meta in self.store.usable_checkpoints(task_id):
            manifest = self.store.manifest(meta.checkpoint_id)
            try:
                self._verify_payloads([(k, d) for k, d in manifest if k != "skills"])
            except CorruptCheckpointError:
                continue
            return meta.checkpoint_id
        return None

    def _maybe_cleanup(self) -> None:
        interval = self.config.periodic_interval.total_seconds()
        if self.config.enable_auto_cleanup and time.monotonic() - self._last_cleanup >= interval:
            self.cleanup_old_checkpoints()
