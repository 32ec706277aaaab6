"""The C part of the row codec (``_rows.c``) against the same work done in Python.

Every other test runs with the C part where it was built; here the rows are decoded
and written both ways and must come out the same: the same entries, hashes and index,
the same bytes sent to Redis, the same task after a recovery, the same refusals."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import hiredis
import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfn_checkpoint import CheckpointManager, KeyLayout, codec, image
from cfn_checkpoint.errors import CorruptCheckpointError
from cfn_checkpoint.model import RedisType, RuntimeEntry, TtlPolicy
from cfn_checkpoint.runtime.commands import TtlClock, restore_commands
from cfn_checkpoint.runtime.redis_runtime import RedisRuntime
from cfn_checkpoint.runtime.transaction import Prepacked

from conftest import require, task_state, wipe
from strategies import task_states, write_state


def test_the_c_part_is_built() -> None:
    """CI builds it (a C compiler is on its machine): else every other test would run
    the Python path only, and this file would compare it with itself."""
    require(image.native is not None, "cfn_checkpoint._rows was not built (no C compiler?)")


@contextmanager
def python_only() -> Iterator[None]:
    """Rows decoded and written in Python, as where the C part was not built."""
    saved = image.native
    image.native = None
    try:
        yield
    finally:
        image.native = saved


def _row(key: bytes, kind: bytes, value: Any, ttl: bool, native: Any = False) -> bytes:
    return msgpack.packb([key, kind, value, ttl, native], use_bin_type=False)


def _base(*rows: bytes) -> codec.Payload:
    raw = b"".join(rows)
    return codec.Payload("base", codec.digest_of(raw), raw)


def _both(decode: Callable[[], Any]) -> tuple[Any, Any]:
    """``decode()`` with the C part, then in Python (each raising or not)."""
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    outcomes = []
    for mode in ("c", "python"):
        with python_only() if mode == "python" else nullcontext():
            try:
                outcomes.append(decode())
            except CorruptCheckpointError as exc:
                outcomes.append(exc)
    return outcomes[0], outcomes[1]


_values = st.binary(max_size=40)
_plain_rows = st.tuples(
    st.binary(min_size=1, max_size=6),
    st.sampled_from([b"string", b"list"]),
    st.one_of(_values, st.lists(_values, max_size=5)),
    st.one_of(st.none(), st.integers(min_value=-5_000, max_value=5_000)),
)


def _rows_of(drawn: list[tuple[bytes, bytes, Any, int | None]]) -> tuple[list[bytes], dict]:
    """Rows (a string row holds bytes, a list row a list; else the row is not plain)
    and their expiries, keyed once each."""
    rows, expiries = {}, {}
    for key, kind, value, expiry in drawn:
        rows[key] = _row(key, kind, value, expiry is not None)
        expiries[key] = expiry
    return [rows[k] for k in sorted(rows)], {k: expiries[k] for k in sorted(rows)}


@settings(max_examples=200, deadline=None)
@given(drawn=st.lists(_plain_rows, max_size=20), odd=st.lists(st.integers(0, 30), max_size=4))
def test_rows_decode_the_same_either_way(drawn: list[Any], odd: list[int]) -> None:
    """Rows of every kind (plain ones, a string holding a list, a TTL flag that
    disagrees with the TTL payload, hashes, a native type) give the same entries,
    runtime hash and index decoded in C as in Python."""
    rows, expiries = _rows_of(drawn)
    extra = [
        _row(b"~h", b"hash", [b"f", b"v"], False),
        _row(b"~n", b"string", b"v", False, b"stream"),
        _row(b"~t", b"string", b"v", True),  # a TTL flag with no expiry: refused
        _row(b"~u", b"list", [b"x"], False),  # an expiry for a row without the flag
    ]
    rows += [extra[i % len(extra)] for i in odd]
    unique = {msgpack.unpackb(r, raw=True)[0]: r for r in rows}
    rows = [unique[k] for k in sorted(unique)]
    pairs = [[k, x] for k, x in expiries.items()] + [[b"~u", 60_000]]
    ttl = codec.make_payload("ttl", [1_000, pairs])
    half = len(rows) // 2

    def decode() -> Any:
        got = image.decode_image([_base(*rows[:half]), _base(*rows[half:]), ttl])
        return got.entries, got.runtime_hash, got.current, got.keyframe.index

    c, python = _both(decode)
    if isinstance(python, Exception):  # the row with a TTL flag and no expiry
        assert type(c) is type(python) and str(c) == str(python)
    else:
        assert c == python


_CUT = _row(b"k", b"string", b"v", False)[:-3]
_DEEP = b"\x95\xa1k" + b"\x91" * 200 + b"\xc0" + b"\xc2\xc2\xc2"  # nested 200 deep


@pytest.mark.parametrize(
    "bad",
    [
        msgpack.packb(7),
        msgpack.packb([b"k", b"string", b"v", False]),
        msgpack.packb([7, b"string", b"v", False, False]),
        msgpack.packb([b"k", [b"string"], b"v", False, False]),
        msgpack.packb([b"k", b"hash", {b"f": b"v"}, False, False]),
        _CUT,
        b"\x95\xa1k\xc1\xa1v\xc2\xc2",  # 0xc1: no msgpack type
        _DEEP,  # msgpack in Python decodes it, and finds a list where a type name goes
    ],
    ids=["not a list", "4 items", "key not bytes", "type a list", "a map", "cut", "c1", "deep"],
)
def test_a_damaged_row_is_refused_either_way(bad: bytes) -> None:
    good = _row(b"a", b"string", b"v", False)
    ttl = codec.make_payload("ttl", [1_000, []])
    c, python = _both(lambda: image.decode_image([_base(good, bad), ttl]).entries)
    assert isinstance(c, CorruptCheckpointError), c
    if bad is _CUT:
        # msgpack in Python stops quietly at a row cut short at a payload's end: the
        # payload decodes without it, and verify_contents then refuses the checkpoint
        # as its runtime hash no longer matches (test_corruption.py).
        assert python == [image.decode_row(good, None)]
        return
    assert isinstance(python, CorruptCheckpointError), python


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=64), offset=st.integers(-2, 70))
def test_scanning_any_bytes_returns_or_refuses(data: bytes, offset: int) -> None:
    """Bytes that are not rows raise ValueError, never read past their end."""
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    native = image.native
    try:
        keys, rows = native.scan(data, offset)
    except ValueError:
        return
    assert b"".join(rows) == data[offset:] and len(keys) == len(rows)
    odd = native.classify(rows, [None] * len(rows))
    plain = [rows[i] for i in range(len(rows)) if i not in set(odd)]
    native.restore(plain, [None] * len(plain), 0, 0, 0, b"")


def test_the_c_functions_refuse_what_they_cannot_take() -> None:
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    native = image.native
    row = _row(b"k", b"string", b"v", True)
    with pytest.raises(ValueError, match="differ in length"):
        native.classify([row], [])
    with pytest.raises(ValueError, match="differ in length"):
        native.restore([row], [], 0, 0, 0, b"")
    with pytest.raises(ValueError, match="not a plain row"):
        native.restore([_row(b"k", b"hash", [], False)], [None], 0, 0, 0, b"")
    with pytest.raises(TypeError, match="not an int"):
        native.restore([row], [1.5], 0, 0, 0, b"")
    with pytest.raises(ValueError, match="offset"):
        native.scan(row, len(row) + 1)
    with pytest.raises(TypeError):
        native.scan("not bytes")  # type: ignore[arg-type]


_clock_policies = st.sampled_from(["absolute", "remaining"])
#: Rows as a capture makes them: a string's value is bytes, a list's a list of bytes.
_true_plain_rows = st.one_of(
    st.tuples(
        st.binary(min_size=1, max_size=6),
        st.just(b"string"),
        _values,
        st.none() | st.integers(-5_000, 5_000),
    ),
    st.tuples(
        st.binary(min_size=1, max_size=6),
        st.just(b"list"),
        st.lists(_values, max_size=5),
        st.none() | st.integers(-5_000, 5_000),
    ),
)


@settings(max_examples=200, deadline=None)
@given(
    drawn=st.lists(_true_plain_rows, max_size=25),
    elapsed=st.integers(0, 3_000),
    locks=_clock_policies,
    others=_clock_policies,
)
def test_commands_from_row_bytes_are_those_made_in_python(
    drawn: list[Any], elapsed: int, locks: str, others: str
) -> None:
    """The RESP the C part writes for plain rows is byte for byte what hiredis packs of
    the commands made in Python, with the same keys left out for a lapsed TTL."""
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    rows, expiries = _rows_of(
        [(b"lock:" + k if i % 3 else k, *rest) for i, (k, *rest) in enumerate(drawn)]
    )
    keys = [msgpack.unpackb(r, raw=True)[0] for r in rows]
    instants = [None if x is None else 10_000 + x for x in expiries.values()]
    clock = TtlClock(elapsed, TtlPolicy(locks, others), b"lock:")  # type: ignore[arg-type]
    decoded = image.DecodedRows(keys, list(rows), instants, 7_000)
    made = restore_commands("t", (b"",), decoded, clock)
    with python_only():
        python = restore_commands(
            "t", (b"",), image.DecodedRows(keys, list(rows), instants, 7_000), clock
        )
    assert python.commands is not None and made.commands is not None
    packed = b"".join(map(hiredis.pack_command, python.commands))
    sent = b"".join(
        c.data if isinstance(c, Prepacked) else hiredis.pack_command(c) for c in made.commands
    )
    assert sent == packed
    assert made.written == python.written and made.lapsed == python.lapsed


def test_thousands_of_lists_are_deleted_a_thousand_a_command() -> None:
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    rows = [_row(b"q%05d" % i, b"list", [b"a"] * (i % 3), i % 2 == 0) for i in range(2_345)]
    instants = [8_000 + i if i % 2 == 0 else None for i in range(len(rows))]
    data, count, lapsed, others = image.native.restore(rows, instants, 7_000, 0, 0, b"")
    python = restore_commands(
        "t",
        (b"",),
        [image.plain_entry(r, x, 7_000) for r, x in zip(rows, instants, strict=True)],
        TtlClock(0, TtlPolicy(), b""),
    )
    assert python.commands is not None
    assert data == b"".join(map(hiredis.pack_command, python.commands))
    assert count == len(python.commands) and [c[0] for c in python.commands[:3]] == [b"DEL"] * 3
    assert (lapsed, others) == ([], [])


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(states=st.lists(task_states, min_size=2, max_size=3))
def test_a_changing_task_recovers_the_same_either_way(
    redis_url: str,
    new_db_url: Callable[[], str],
    layout: KeyLayout,
    prefix: str,
    states: list[dict[Any, Any]],
) -> None:
    """Keyframes and deltas of random tasks, loaded and recovered with the C part and
    without: the same contents, and the task as it was."""
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    manager = CheckpointManager.open(redis_url, new_db_url(), layout=layout)
    try:
        client = manager.runtime.client
        wipe(client, prefix)
        taken = []
        for state in states:
            manager.runtime.delete_task("t")
            write_state(client, layout, "t", {("agent", b"anchor"): ("string", b"", None), **state})
            meta = manager.create_checkpoint("t")
            taken.append((meta, task_state(client, prefix)))
        contents: dict[str, list[Any]] = {}
        for mode in ("c", "python"):
            with python_only() if mode == "python" else nullcontext():
                for meta, expected in reversed(taken):
                    loaded = manager.load_checkpoint(meta.checkpoint_id)
                    contents.setdefault(mode, []).append((loaded.entries, loaded.current))
                    manager.recover_from_checkpoint("t", meta.checkpoint_id)
                    assert task_state(client, prefix) == expected, mode
        assert contents["c"] == contents["python"]
    finally:
        manager.close()


def test_a_large_task_is_written_in_batches_the_same_either_way(
    plain_redis_url: str, prefix: str
) -> None:
    """Above ``atomic_max_keys`` each batch's MULTI/EXEC takes its rows' RESP."""
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    client = redis.Redis.from_url(plain_redis_url)
    layout = KeyLayout(prefix=prefix)
    rng = random.Random(5)
    entries = []
    for i in range(60):
        key = layout.key("queue" if i % 2 else "agent", "t", f"k{i:03d}")
        if i % 2:
            entries.append(RuntimeEntry(key, RedisType.LIST, [b"%d" % rng.randrange(9)] * (i % 4)))
        else:
            entries.append(
                RuntimeEntry(key, RedisType.STRING, b"v%d" % i, 600_000 if i % 4 else None)
            )
    entries.append(RuntimeEntry(layout.key("agent", "t", "h"), RedisType.HASH, [(b"f", b"v")]))
    entries.sort()
    try:
        states = []
        for mode in ("c", "python"):
            with python_only() if mode == "python" else nullcontext():
                wipe(client, prefix)
                client.set(layout.key("agent", "t", "stale"), b"x")
                runtime = RedisRuntime(client, layout=layout)
                now = runtime.server_time_ms()
                as_stored = [  # bytes for the C part, their fields for Python
                    _row(e.key, e.type.value.encode(), e.value, e.pttl_ms is not None)
                    if e.type in (RedisType.STRING, RedisType.LIST)
                    else e
                    for e in entries
                ]
                if mode == "python":
                    as_stored = [
                        msgpack.unpackb(r, raw=True) if isinstance(r, bytes) else r
                        for r in as_stored
                    ]
                rows = image.DecodedRows(
                    [e.key for e in entries],
                    as_stored,
                    [None if e.pttl_ms is None else now + e.pttl_ms for e in entries],
                    now,
                )
                stats = runtime.restore("t", rows, now, atomic_max_keys=20, batch_keys=7)
                assert (stats.keys_written, stats.keys_removed, stats.atomic) == (61, 1, False)
                states.append(task_state(client, prefix))
        assert states[0] == states[1]
    finally:
        wipe(client, prefix)
        client.close()


@pytest.mark.parametrize(
    "expiry",
    [-(2**63), 2**63, -(2**62), 2**62, True, 2**70],
    ids=["-2^63", "2^63", "-2^62", "2^62", "a bool", "2^70"],
)
def test_an_expiry_beyond_64_bits_is_planned_as_in_python(expiry: int) -> None:
    """Never from a real clock, but a TTL payload may hold any int: the C part leaves
    such rows to Python rather than overflow."""
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    rows = [_row(b"a", b"string", b"v", True), _row(b"b", b"list", [b"x"], False)]
    clock = TtlClock(5, TtlPolicy("absolute", "absolute"), b"")
    made = restore_commands(
        "t", (b"",), image.DecodedRows([b"a", b"b"], rows, [expiry, None], 1), clock
    )
    with python_only():
        listed = [msgpack.unpackb(r, raw=True) for r in rows]
        python = restore_commands(
            "t", (b"",), image.DecodedRows([b"a", b"b"], listed, [expiry, None], 1), clock
        )
    assert python.commands is not None and made.commands is not None
    sent = b"".join(
        c.data if isinstance(c, Prepacked) else hiredis.pack_command(c) for c in made.commands
    )
    assert sent == b"".join(map(hiredis.pack_command, python.commands))
    assert (made.written, made.lapsed) == (python.written, python.lapsed)


def test_a_row_larger_than_msgpacks_default_buffer_decodes_either_way() -> None:
    """msgpack refuses more than 100 MiB in one buffer by default; a payload's own
    size is its buffer, in a keyframe chunk and in a delta (whose header is decoded
    in Python either way)."""
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    value = b"v" * ((100 << 20) + 1)
    row = _row(b"k", b"string", value, False)
    ttl = codec.make_payload("ttl", [1_000, []])
    c, python = _both(lambda: image.decode_image([_base(row), ttl]).entries)
    assert c == python == [image.decode_row(row, None)]
    delta_raw = msgpack.packb([]) + row
    delta = codec.Payload("delta", codec.digest_of(delta_raw), delta_raw)
    basettl = codec.make_payload("basettl", [1_000, []])
    small = _row(b"a", b"string", b"x", False)
    c, python = _both(lambda: image.decode_image([_base(small), delta, basettl, ttl]).entries)
    assert c == python and [e.key for e in c] == [b"a", b"k"]


_sized = st.sampled_from([0, 1, 31, 32, 255, 256, 65_535, 65_536]).map(lambda n: b"x" * n)
_capture_values = st.one_of(
    st.binary(max_size=40),
    _sized,
    st.lists(st.binary(max_size=8), max_size=20),
    st.integers(0, 3).map(lambda n: [b"i"] * (15 + n)),
)
_capture_items = st.tuples(
    st.binary(max_size=5),
    st.sampled_from([b"string", b"list", b"hash", b"set", b"zset", b"dump:stream", b"dump:"]),
    st.one_of(st.sampled_from([-2, -1, 0, 999, 1_000, 1_001]), st.integers(-(2**64), 2**64)),
    _capture_values,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(_capture_items, max_size=12))
def test_a_capture_packs_to_the_same_rows_either_way(items: list[Any]) -> None:
    """The rows a capture packs to (their bytes name and cut the payloads, so they must
    not change): every str and array size class, DUMP payloads, expiries past, now,
    to come and beyond 64 bits, keys read twice."""
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    flat = [part for item in items for part in item]
    keys = [item[0] for item in items]
    if len(set(keys)) == len(keys) and all(-(2**63) <= item[2] < 2**63 for item in items):
        image.native.pack(flat, 1_000)  # packed in C: it does not refuse
    made = image.packed_rows(flat, 1_000)
    with python_only():
        python = image.packed_rows(flat, 1_000)
    assert made == python


def test_a_capture_of_other_items_is_packed_in_python() -> None:
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    native = image.native
    for flat in (
        [b"k", b"string", 5, "text"],  # a value of another type
        [b"k", b"list", 5, [b"a", 1]],
        [b"k", "string", 5, b"v"],
        [b"k", b"string", 5.0, b"v"],
        [b"k", b"string", 1, b"v", b"k", b"string", 1, b"w"],  # a key twice
        [b"k", b"string", 2**64, b"v"],
        [b"k", b"string", 1],
    ):
        with pytest.raises(ValueError):
            native.pack(flat, 0)
    assert image.packed_rows([b"k", b"string", 1, b"v", b"k", b"string", 1, b"v"], 0).keys == [b"k"]


def test_a_capture_of_the_largest_size_classes_packs_the_same_either_way() -> None:
    """Strings and arrays of 65,536 (str32, array32), with neighbours."""
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    flat = [
        b"a", b"string", 5, b"x" * 65_536,
        b"b", b"list", -1, [b""] * 65_536,
        b"c", b"dump:" + b"n" * 65_536, 5, b"d" * 65_535,
        b"d" * 65_536, b"set", 0, [b"m"] * 65_535,
    ]  # fmt: skip
    made = image.packed_rows(flat, 1)
    with python_only():
        assert made == image.packed_rows(flat, 1)


def test_a_capture_the_c_part_refuses_is_never_seen_half_packed() -> None:
    """The result lists never hold an empty slot (they grow by appending), and a
    duplicate key or an expiry beyond 64 bits is found before they are filled: a
    collection run while the refusal is made (here, inside an ``except`` block, with
    a callback indexing every list) never meets a half-made list."""
    require(image.native is not None, "cfn_checkpoint._rows was not built")
    script = """
import gc
from cfn_checkpoint import image
flat = [part for i in range(7) for part in (b"k%d" % i, b"string", 5, b"v")]
flat[-2] = 2**70 if WHAT == "overflow" else 5
flat[-4] = b"k0" if WHAT == "twice" else flat[-4]
seen = []
def look(phase, info):  # an empty slot, indexed, would crash the interpreter
    if phase == "start":
        seen.extend(o[-1] for o in gc.get_objects() if type(o) is list and len(o) == 7)
gc.callbacks.append(look)
try:
    raise KeyError
except KeyError:
    gc.set_threshold(1)
    try:
        image.native.pack(flat, 0)
    except ValueError:
        pass
    gc.set_threshold(700)
print("ok")
"""
    for what in ("overflow", "twice"):
        done = subprocess.run(
            [sys.executable, "-c", f"WHAT = {what!r}" + script], capture_output=True, text=True
        )
        assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_a_capture_not_made_of_plain_types_is_packed_in_python() -> None:
    """A list subclass of items, or a clock that is not an int, goes the Python way."""
    require(image.native is not None, "cfn_checkpoint._rows was not built")

    class Shouting(list):  # type: ignore[type-arg]
        def __getitem__(self, at: Any) -> Any:
            got = super().__getitem__(at)
            return (
                [x.upper() if isinstance(x, bytes) else x for x in got]
                if isinstance(at, slice)
                else got
            )

    flat = Shouting([b"k", b"string", 5, b"v"])
    assert image.packed_rows(flat, 1).keys == [b"K"]
    assert image.packed_rows([b"k", b"string", 5, b"v"], 3.0).expiries == [5]  # type: ignore[arg-type]
