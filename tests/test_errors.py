"""Every error path: the right typed error, a clear one-line message, and nothing written.

After each failing call the durable store has no new or changed rows (catalog,
manifests, payloads, recoveries, domain rows) and the Redis keys under the test's
prefix are exactly as before. Real Redis and real durable stores throughout (SQLite
files, PostgreSQL schemas); tests about SQLite files themselves run on SQLite only.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from cfn_checkpoint import (
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    CheckpointMetadata,
    CheckpointNotFoundError,
    CheckpointStatus,
    CorruptCheckpointError,
    EmbeddedRedis,
    ErrorCode,
    KeyLayout,
    LockTimeoutError,
    StoreUnavailableError,
    TtlPolicy,
    ValidationError,
)
from cfn_checkpoint.durable.sqlite import SqliteStore
from cfn_checkpoint.manager import open_store
from cfn_checkpoint.runtime import connection
from cfn_checkpoint.runtime.lock import TaskLock
from cfn_checkpoint.runtime.redis_runtime import RedisRuntime, connect

from conftest import task_state
from db_support import TABLES, raw_sql, sql_dump

ALPHA = "alpha"  # has runtime keys, durable rows and two checkpoints
BETA = "beta"  # has runtime keys and no checkpoint


def expect(
    call: Callable[[], Any], error: type[CheckpointError], *fragments: str
) -> CheckpointError:
    """``call`` raises exactly ``error`` with a one-line message naming ``fragments``."""
    with pytest.raises(CheckpointError) as info:
        call()
    err = info.value
    assert type(err) is error, f"{type(err).__name__} instead of {error.__name__}: {err}"
    assert err.code == error.code
    message = str(err)
    assert message.strip(), "empty message"
    assert "\n" not in message and "\r" not in message, f"multi-line message: {message!r}"
    assert message == err.message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return err


def durable_rows(db_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, read with the backend's plain driver."""
    return {t: rows for t, rows in sql_dump(db_url).items() if t in TABLES}


class World:
    """The test's Redis keys and durable store, and a check that a failing call changed none."""

    def __init__(self, manager: CheckpointManager, db_url: str, prefix: str) -> None:
        self.manager = manager
        self.client: redis.Redis = manager.runtime.client
        self.layout = manager.runtime.layout
        self.db_url = db_url
        self.prefix = prefix

    def snapshot(self) -> tuple[dict[bytes, Any], dict[str, list[tuple[Any, ...]]]]:
        return task_state(self.client, self.prefix), durable_rows(self.db_url)

    @contextmanager
    def unchanged(self) -> Iterator[None]:
        keys_before, rows_before = self.snapshot()
        yield
        keys_after, rows_after = self.snapshot()
        assert keys_after == keys_before, "Redis keys changed"
        for table in TABLES:
            assert rows_after.get(table) == rows_before.get(table), f"{table} changed"

    def fails(
        self, call: Callable[[], Any], error: type[CheckpointError], *fragments: str
    ) -> CheckpointError:
        with self.unchanged():
            return expect(call, error, *fragments)


@pytest.fixture()
def world(manager: CheckpointManager, db_url: str, prefix: str) -> World:
    w = World(manager, db_url, prefix)
    alpha = manager.writer(ALPHA)
    alpha.put_agent("coder", {"step": 1})
    alpha.set_signal("phase", "build", ttl_ms=600_000)
    alpha.push_queue("work", "a", "b")
    alpha.acquire_lock("leader", "owner-1", ttl_ms=600_000)
    manager.durable.record_task_result(ALPHA, "coder", {"ok": True}, confidence=0.9)
    manager.durable.record_audit_event(ALPHA, "started")
    manager.durable.put_skill("skill-1", name="search")
    manager.create_checkpoint(ALPHA, metadata={"n": 1})
    alpha.put_agent("coder", {"step": 2})
    manager.create_checkpoint(ALPHA, metadata={"n": 2})
    alpha.put_agent("coder", {"step": 3})  # not checkpointed: a restore would be visible
    beta = manager.writer(BETA)
    beta.put_agent("tester", {"step": 1})
    beta.push_queue("work", "x")
    return w


def newest(world: World, task: str = ALPHA) -> CheckpointMetadata:
    return world.manager.list_checkpoints(task)[0]


# -- opening the tiers -------------------------------------------------------------------


def test_unreachable_redis(db_url: str) -> None:
    err = expect(
        lambda: CheckpointManager.open("redis://127.0.0.1:1/0", db_url),
        StoreUnavailableError,
        "127.0.0.1:1",
    )
    assert isinstance(err, ConnectionError)
    assert isinstance(err.__cause__, redis.ConnectionError)  # the cause is kept
    rows = durable_rows(db_url)
    assert not rows.get("checkpoints") and not rows.get("payloads")


@pytest.mark.parametrize(
    "url",
    ["redis://:s3cr3t-pw@127.0.0.1:1/0", "redis://admin:s3cr3t-pw@127.0.0.1:1/0"],
)
def test_unreachable_redis_message_does_not_reveal_the_password(db_url: str, url: str) -> None:
    err = expect(lambda: CheckpointManager.open(url, db_url), StoreUnavailableError, "127.0.0.1")
    assert "s3cr3t-pw" not in str(err)


def test_malformed_redis_url_message_does_not_reveal_the_password(db_url: str) -> None:
    err = expect(
        lambda: CheckpointManager.open("redis://:s3cr3t-pw@127.0.0.1:notaport/0", db_url),
        ValidationError,
    )
    assert "s3cr3t-pw" not in str(err)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "not a url", "redis://127.0.0.1:notaport/0", "ftp://x/0"]
)
def test_malformed_redis_url(db_url: str, url: str) -> None:
    err = expect(lambda: CheckpointManager.open(url, db_url), ValidationError, "Redis URL")
    assert isinstance(err, ValueError)


def test_bad_redis_port_in_environment(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CFN_REDIS_URL", raising=False)
    monkeypatch.setenv("CFN_REDIS_HOST", "127.0.0.1")
    monkeypatch.setenv("CFN_REDIS_PORT", "six-three-seven-nine")
    expect(lambda: CheckpointManager.open(None, db_url), ValidationError, "CFN_REDIS_PORT")


@pytest.mark.parametrize(
    ("durable_url", "fragment"),
    [
        ("mysql://user@db/cfn", "mysql://user@db/cfn"),
        ("http://example.com/cfn.db", "http://example.com/cfn.db"),
        ("cfn.db", "cfn.db"),
        ("postgresql://user@db:notaport/cfn", "bad port"),
        ("postgres://user@[db/cfn", "malformed PostgreSQL URL"),
        ("sqlite://host/cfn.db", "host"),
        ("sqlite:///", "names no file"),
    ],
)
def test_unusable_durable_url(
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    durable_url: str,
    fragment: str,
) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    expect(lambda: CheckpointManager.open(redis_url, durable_url), ValidationError, fragment)
    assert list(workdir.iterdir()) == []  # no stray database file


def test_sqlite_file_in_a_missing_directory(redis_url: str, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    expect(
        lambda: CheckpointManager.open(redis_url, f"sqlite:///{missing / 'cfn.db'}"),
        StoreUnavailableError,
        str(missing),
    )
    assert not (tmp_path / "no").exists()


def test_a_file_that_is_not_sqlite(redis_url: str, tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    data = b"this is not a database\n" + os.urandom(4000)
    junk.write_bytes(data)
    expect(
        lambda: CheckpointManager.open(redis_url, f"sqlite:///{junk}"),
        StoreUnavailableError,
        str(junk),
    )
    assert junk.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.db"]


def test_a_directory_as_the_sqlite_file(redis_url: str, tmp_path: Path) -> None:
    expect(
        lambda: CheckpointManager.open(redis_url, f"sqlite:///{tmp_path}"),
        StoreUnavailableError,
    )


def test_a_store_from_a_newer_version(redis_url: str, db_url: str) -> None:
    open_store(db_url).close()
    with raw_sql(db_url) as db:
        db.execute("INSERT INTO cfn_schema_migrations VALUES (99, '2099-01-01T00:00:00+00:00')")
    before = durable_rows(db_url)
    expect(lambda: CheckpointManager.open(redis_url, db_url), StoreUnavailableError, "upgrade")
    assert durable_rows(db_url) == before


# -- bad input -------------------------------------------------------------------------------

BAD_TASK_IDS = [
    pytest.param("", "empty", id="empty"),
    pytest.param("t" * 201, "201", id="too-long"),
    pytest.param("a:b", "':'", id="colon"),
    pytest.param("a*", "'*'", id="star"),
    pytest.param("a?", "'?'", id="question"),
    pytest.param("a[b", "'['", id="bracket"),
    pytest.param("a\\b", "'\\\\'", id="backslash"),
    pytest.param("a b", "' '", id="space"),
    pytest.param("a\nb", "'\\n'", id="newline"),
    pytest.param("{a}", "'{'", id="brace"),
    pytest.param("tâche", "'â'", id="non-ascii"),
    pytest.param(None, "NoneType", id="none"),
    pytest.param(42, "int", id="int"),
    pytest.param(b"alpha", "bytes", id="bytes"),
]


@pytest.mark.parametrize(("task_id", "fragment"), BAD_TASK_IDS)
def test_bad_task_id(world: World, task_id: Any, fragment: str) -> None:
    m = world.manager
    cp = newest(world).checkpoint_id
    calls: list[Callable[[], Any]] = [
        lambda: m.create_checkpoint(task_id),
        lambda: m.create_checkpoint(task_id, "task_completion", {"n": 9}),
        lambda: m.recover_from_checkpoint(task_id),
        lambda: m.recover_from_checkpoint(task_id, cp),
        lambda: m.writer(task_id),
        lambda: TaskLock(world.client, task_id, prefix=world.prefix),
    ]
    if task_id is not None:  # list_checkpoints(None) lists every task
        calls.append(lambda: m.list_checkpoints(task_id))
    for call in calls:
        world.fails(call, ValidationError, "task id", fragment)


def test_longest_task_id_is_accepted(world: World) -> None:
    task = "t" * 200
    world.manager.writer(task).put_agent("a", "x")
    meta = world.manager.create_checkpoint(task)
    assert world.manager.recover_from_checkpoint(task).checkpoint_id == meta.checkpoint_id


@pytest.mark.parametrize("trigger", ["sometimes", "", "MANUAL ", 5, None])
def test_unknown_trigger(world: World, trigger: Any) -> None:
    world.fails(
        lambda: world.manager.create_checkpoint(ALPHA, trigger),
        ValidationError,
        "trigger",
        "task_completion, iteration_boundary, periodic, manual",
    )


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"x": object()}, id="object"),
        pytest.param({"x": {1, 2}}, id="set"),
        pytest.param({"x": b"bytes"}, id="bytes"),
        pytest.param({(1, 2): "tuple key"}, id="tuple-key"),
        pytest.param({"x": {"y": [1, object()]}}, id="nested"),
        pytest.param([("x", 1)], id="list"),
        pytest.param("x=1", id="str"),
    ],
)
def test_metadata_that_is_not_json(world: World, metadata: Any) -> None:
    world.fails(
        lambda: world.manager.create_checkpoint(ALPHA, "manual", metadata),
        ValidationError,
        "metadata",
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_metadata_with_non_finite_numbers_is_not_json(world: World, value: float) -> None:
    """NaN and Infinity have no JSON form (RFC 8259); json.dumps only writes them by default."""
    world.fails(
        lambda: world.manager.create_checkpoint(ALPHA, "manual", {"score": value}),
        ValidationError,
        "metadata",
    )


@pytest.mark.parametrize("status", ["done", "", "COMPLETED ", 3])
def test_list_with_a_bad_status(world: World, status: Any) -> None:
    world.fails(
        lambda: world.manager.list_checkpoints(ALPHA, status=status),
        ValidationError,
        "status",
        "in_progress, completed, failed, recovered",
    )


@pytest.mark.parametrize("limit", [0, -1, -100])
def test_list_with_a_bad_limit(world: World, limit: int) -> None:
    world.fails(
        lambda: world.manager.list_checkpoints(ALPHA, limit=limit), ValidationError, "limit"
    )


@pytest.mark.parametrize("limit", ["3"])
def test_list_with_a_limit_that_is_not_a_number(world: World, limit: Any) -> None:
    world.fails(
        lambda: world.manager.list_checkpoints(ALPHA, limit=limit), ValidationError, "limit"
    )


def test_cleanup_with_a_negative_age(world: World) -> None:
    # With a cutoff in the future this would remove the older checkpoint of ALPHA.
    assert len(world.manager.list_checkpoints(ALPHA)) == 2
    world.fails(
        lambda: world.manager.cleanup_old_checkpoints(older_than=timedelta(seconds=-1)),
        ValidationError,
        "older_than",
    )
    world.fails(
        lambda: world.manager.cleanup_old_checkpoints(older_than=timedelta(0), keep_last=0),
        ValidationError,
        "keep_last",
    )
    assert len(world.manager.list_checkpoints(ALPHA)) == 2


@pytest.mark.parametrize("older_than", [-1, 3600])
def test_cleanup_with_an_age_that_is_not_a_timedelta(world: World, older_than: Any) -> None:
    world.fails(
        lambda: world.manager.cleanup_old_checkpoints(older_than=older_than),
        ValidationError,
        "older_than",
    )


def test_bad_options_elsewhere(world: World) -> None:
    writer = world.manager.writer(ALPHA)
    for call, fragment in [
        (lambda: writer.put_agent("", "x"), "name"),
        (lambda: writer.set_signal("s", "x", ttl_ms=0), "TTL"),
        (lambda: writer.set_signal("s", "x", ttl_ms=-5), "TTL"),
        (lambda: writer.set_signal("s", "x", ttl_ms=1.5), "TTL"),  # type: ignore[arg-type]
        (lambda: writer.push_queue("q"), "item"),
        (lambda: writer.acquire_lock("l", "", ttl_ms=1000), "owner"),
        (lambda: KeyLayout(prefix="tenant*:"), "prefix"),
        (lambda: KeyLayout(agent="a:b"), "namespace"),
        (lambda: KeyLayout(agent="swarm"), "differ"),
        (
            lambda: world.manager.recover_from_checkpoint(
                ALPHA, restore_runtime=False, restore_durable=False
            ),
            "nothing to recover",
        ),
    ]:
        world.fails(call, ValidationError, fragment)


@pytest.mark.parametrize("policy", [{"locks": "forever"}])
def test_bad_ttl_policy_is_a_validation_error(policy: dict[str, str]) -> None:
    """errors.py: every error the library raises on purpose is a CheckpointError."""
    expect(lambda: TtlPolicy(**policy), ValidationError, "TTL policy")


# -- checkpoints that cannot be used -----------------------------------------------------------


def test_recover_a_task_with_no_checkpoints(world: World) -> None:
    world.fails(
        lambda: world.manager.recover_from_checkpoint(BETA),
        CheckpointNotFoundError,
        BETA,
    )
    world.fails(
        lambda: world.manager.recover_from_checkpoint("never-seen", restore_durable=True),
        CheckpointNotFoundError,
        "never-seen",
    )


def test_recover_with_a_checkpoint_of_another_task(world: World) -> None:
    cp = newest(world)
    world.fails(
        lambda: world.manager.recover_from_checkpoint(BETA, cp.checkpoint_id),
        ValidationError,
        cp.checkpoint_id,
        ALPHA,
        BETA,
    )
    assert world.manager.get_checkpoint(cp.checkpoint_id).status == CheckpointStatus.COMPLETED


@pytest.mark.parametrize("checkpoint_id", ["cp_missing", "", "cp_alpha_' OR 1=1 --", 7])
def test_unknown_checkpoint_id(world: World, checkpoint_id: Any) -> None:
    m = world.manager
    for call in (
        lambda: m.recover_from_checkpoint(ALPHA, checkpoint_id),
        lambda: m.get_checkpoint(checkpoint_id),
        lambda: m.load_checkpoint(checkpoint_id),
    ):
        world.fails(call, CheckpointNotFoundError, "no checkpoint")


def test_recover_from_a_failed_checkpoint(world: World) -> None:
    failed = replace(
        newest(world),
        checkpoint_id="cp_alpha_failed",
        status=CheckpointStatus.FAILED,
        completed_at=None,
        error="disk full",
    )
    world.manager.store.record_failure(failed)
    world.fails(
        lambda: world.manager.recover_from_checkpoint(ALPHA, "cp_alpha_failed"),
        ValidationError,
        "cp_alpha_failed",
        "failed",
    )
    # Without an id the failed one is skipped, never chosen.
    assert world.manager.recover_from_checkpoint(ALPHA).checkpoint_id != "cp_alpha_failed"


def _corrupt_payload(db_url: str, checkpoint_id: str, how: str, done: set[str]) -> None:
    with raw_sql(db_url) as conn:
        (digest,) = conn.execute(
            "SELECT digest FROM checkpoint_payloads WHERE checkpoint_id = ? AND kind = 'base'"
            " ORDER BY ordinal LIMIT 1",
            (checkpoint_id,),
        ).fetchone()
        if digest in done and how != "no-manifest":
            return  # shared by both checkpoints: damaging it twice would undo a flip
        done.add(digest)
        if how == "flip":
            (data,) = conn.execute(
                "SELECT data FROM payloads WHERE digest = ?", (digest,)
            ).fetchone()
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            conn.execute("UPDATE payloads SET data = ? WHERE digest = ?", (bytes(data), digest))
        elif how == "garbage":
            conn.execute("UPDATE payloads SET data = ? WHERE digest = ?", (b"\x00junk", digest))
        elif how == "missing":
            conn.execute("DELETE FROM payloads WHERE digest = ?", (digest,))
        elif how == "no-manifest":
            conn.execute(
                "DELETE FROM checkpoint_payloads WHERE checkpoint_id = ?", (checkpoint_id,)
            )


@pytest.mark.parametrize("how", ["flip", "garbage", "missing", "no-manifest"])
def test_corrupt_checkpoint(world: World, how: str) -> None:
    m = world.manager
    cps = m.list_checkpoints(ALPHA)
    # Corrupt both checkpoints of ALPHA (they may share payloads): nothing intact is left.
    damaged: set[str] = set()
    for cp in cps:
        _corrupt_payload(world.db_url, cp.checkpoint_id, how, damaged)
    for cp in cps:
        cid = cp.checkpoint_id
        world.fails(lambda c=cid: m.load_checkpoint(c), CorruptCheckpointError, cid)
        world.fails(
            lambda c=cid: m.recover_from_checkpoint(ALPHA, c, restore_durable=True),
            CorruptCheckpointError,
            cid,
        )
    world.fails(lambda: m.recover_from_checkpoint(ALPHA), CorruptCheckpointError, ALPHA)
    assert [c.status for c in m.list_checkpoints(ALPHA)] == [CheckpointStatus.COMPLETED] * 2


# -- stores that stop working ---------------------------------------------------------------


def test_lock_held_elsewhere(world: World) -> None:
    impatient = CheckpointManager(
        world.manager.runtime,
        world.manager.store,
        config=CheckpointConfig(lock_timeout=0.2, enable_auto_cleanup=False),
    )
    cp = newest(world).checkpoint_id
    with TaskLock(world.client, ALPHA, prefix=world.prefix):
        for call in (
            lambda: impatient.create_checkpoint(ALPHA),
            lambda: impatient.recover_from_checkpoint(ALPHA),
            lambda: impatient.recover_from_checkpoint(ALPHA, cp, restore_durable=True),
        ):
            err = world.fails(call, LockTimeoutError, ALPHA)
            assert isinstance(err, TimeoutError)
        # BETA is not held.
        impatient.create_checkpoint(BETA)


def test_redis_goes_away(db_url: str, prefix: str) -> None:
    server = EmbeddedRedis().start()
    try:
        mgr = CheckpointManager.open(server.url, db_url, layout=KeyLayout(prefix=prefix))
        mgr.writer(ALPHA).put_agent("a", "x")
        cp = mgr.create_checkpoint(ALPHA)
        mgr.writer(ALPHA).put_agent("a", "y")
    finally:
        server.stop()
    try:
        before = durable_rows(db_url)
        for call in (
            lambda: mgr.create_checkpoint(ALPHA),
            lambda: mgr.recover_from_checkpoint(ALPHA),
            lambda: mgr.recover_from_checkpoint(ALPHA, cp.checkpoint_id, restore_durable=True),
        ):
            err = expect(call, StoreUnavailableError, "Redis")
            assert isinstance(err.__cause__, redis.RedisError)
            assert durable_rows(db_url) == before
        assert mgr.get_checkpoint(cp.checkpoint_id).status == CheckpointStatus.COMPLETED
    finally:
        mgr.close()


@pytest.fixture()
def busy_manager(world: World, redis_url: str) -> Iterator[CheckpointManager]:
    """A manager whose store gives up after 0.2 s when another writer holds the file."""
    store = SqliteStore(world.db_url.removeprefix("sqlite:///"), busy_timeout=0.2)
    runtime = RedisRuntime(connect(redis_url), layout=world.layout)
    mgr = CheckpointManager(
        runtime, store, config=CheckpointConfig(enable_auto_cleanup=False, lock_timeout=5.0)
    )
    yield mgr
    mgr.close()


@contextmanager
def sqlite_writer_elsewhere(db_url: str) -> Iterator[None]:
    blocker = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


@pytest.mark.backends("sqlite")  # PostgreSQL's lock waits: test_postgres.py
def test_sqlite_busy_during_create(world: World, busy_manager: CheckpointManager) -> None:
    """Another writer holds the SQLite file: create fails cleanly and can be retried."""
    mgr = busy_manager
    with sqlite_writer_elsewhere(world.db_url):
        err = world.fails(lambda: mgr.create_checkpoint(ALPHA), StoreUnavailableError, "SQLite")
        assert isinstance(err.__cause__, sqlite3.Error)
        world.fails(
            lambda: mgr.recover_from_checkpoint(ALPHA, restore_durable=True),
            StoreUnavailableError,
            "SQLite",
        )
    # The store is usable again right away: nothing was left half-open.
    meta = mgr.create_checkpoint(ALPHA, metadata={"n": 3})
    assert meta.status == CheckpointStatus.COMPLETED
    assert mgr.recover_from_checkpoint(ALPHA).checkpoint_id == meta.checkpoint_id


@pytest.mark.backends("sqlite")
def test_sqlite_busy_during_a_runtime_only_recover(
    world: World, busy_manager: CheckpointManager
) -> None:
    """A recover either fails and changes nothing, or succeeds and says what it could not do.

    What must not happen: an error telling the caller the recover failed while the
    task's runtime keys were in fact replaced (and the recovery left unrecorded).
    """
    mgr = busy_manager
    cp = newest(world)
    keys_before, rows_before = world.snapshot()
    with sqlite_writer_elsewhere(world.db_url):
        try:
            result = mgr.recover_from_checkpoint(ALPHA)
        except StoreUnavailableError as exc:
            assert "\n" not in str(exc)
            keys_after, rows_after = world.snapshot()
            assert rows_after == rows_before
            assert keys_after == keys_before, (
                f"recover raised {exc!r} but replaced the runtime keys of {ALPHA} anyway"
            )
        else:
            assert result.runtime_state_restored and result.checkpoint_id == cp.checkpoint_id
            assert result.errors, "the recovery could not be recorded; the result must say so"
    mgr.recover_from_checkpoint(ALPHA)  # works once the other writer is gone


def test_every_error_class_has_its_code() -> None:
    pairs = {
        ValidationError: ErrorCode.VALIDATION,
        CheckpointNotFoundError: ErrorCode.NOT_FOUND,
        CorruptCheckpointError: ErrorCode.CORRUPT,
        StoreUnavailableError: ErrorCode.STORE_UNAVAILABLE,
        LockTimeoutError: ErrorCode.LOCK_TIMEOUT,
    }
    for cls, code in pairs.items():
        err = cls("one line")
        assert isinstance(err, CheckpointError) and err.code == code and err.message == "one line"


def test_unparseable_redis_url_is_a_validation_error(db_url: str) -> None:
    from cfn_checkpoint import CheckpointManager as Manager

    with pytest.raises(ValidationError) as info:
        Manager.open("redis://[bad", db_url)
    assert "\n" not in str(info.value)


def test_a_redis_server_that_never_answers_is_reported_quickly(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain URL is probed within PROBE_TIMEOUT, not the client's 60 s socket timeout."""
    monkeypatch.setattr(connection, "PROBE_TIMEOUT", 0.5)
    with socket.socket() as silent:  # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://:s3cr3t-pw@127.0.0.1:{silent.getsockname()[1]}/0"
        started = time.monotonic()
        err = expect(lambda: CheckpointManager.open(url, db_url), StoreUnavailableError, "Timeout")
        assert time.monotonic() - started < 3
    assert "s3cr3t-pw" not in str(err)


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_a_server_speaking_another_protocol_is_unavailable(db_url: str, scheme: str) -> None:
    """A port that answers HTTP (a proxy, a web server) is a clear error, not 'unexpected'."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)

        def answer() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = server.accept()
                    with conn:
                        conn.recv(1024)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        url = f"{scheme}://127.0.0.1:{server.getsockname()[1]}"
        expect(lambda: CheckpointManager.open(url, db_url), StoreUnavailableError, "not a Redis")
