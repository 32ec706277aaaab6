"""Keyframes and deltas: every checkpoint of a changing task recovers exactly."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import msgpack
import pytest
import redis
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfn_checkpoint import CheckpointManager, KeyLayout, codec, image
from cfn_checkpoint.errors import CorruptCheckpointError

from conftest import task_state, wipe
from strategies import task_states, write_state


def _kinds(manager: CheckpointManager, checkpoint_id: str) -> list[str]:
    return [k for k, _ in manager.store.manifest(checkpoint_id)]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(states=st.lists(task_states, min_size=2, max_size=4), reopen=st.booleans())
def test_every_checkpoint_of_a_changing_task_recovers_exactly(
    redis_url: str,
    new_db_url: Callable[[], str],
    layout: KeyLayout,
    prefix: str,
    states: list[dict[Any, Any]],
    reopen: bool,
) -> None:
    db_url = new_db_url()
    anchor = {("agent", b"anchor"): ("string", b"", None)}
    taken: list[tuple[str, dict[bytes, Any]]] = []
    manager = CheckpointManager.open(redis_url, db_url, layout=layout)
    try:
        client = manager.runtime.client
        wipe(client, prefix)
        for i, state in enumerate(states):
            if reopen and i:  # a new process: nothing remembered, the keyframe is reloaded
                manager.close()
                manager = CheckpointManager.open(redis_url, db_url, layout=layout)
                client = manager.runtime.client
            manager.runtime.delete_task("t")
            write_state(client, layout, "t", {**anchor, **state})
            meta = manager.create_checkpoint("t")
            taken.append((meta.checkpoint_id, task_state(client, prefix)))
        for checkpoint_id, expected in reversed(taken):
            manager.recover_from_checkpoint("t", checkpoint_id)
            assert task_state(client, prefix) == expected, _kinds(manager, checkpoint_id)
    finally:
        manager.close()


def _many(client: redis.Redis, layout: KeyLayout, n: int, version: int, changed: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        noise = random.Random(i).randbytes(100).hex()  # about as compressible as real state
        value = f'{{"agent":{i},"v":{version if i < changed else 0},"notes":"{noise}"}}'
        pipe.set(
            layout.key("agent", "t", f"a{i:05d}"), value.encode(), px=600_000 if i % 2 else None
        )
    pipe.execute()


def test_one_percent_change_stores_a_small_delta(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    _many(client, layout, 2_000, version=0, changed=0)
    full = manager.create_checkpoint("t")
    assert "delta" not in _kinds(manager, full.checkpoint_id)
    _many(client, layout, 2_000, version=1, changed=20)  # 1% of the keys
    small = manager.create_checkpoint("t")
    assert "delta" in _kinds(manager, small.checkpoint_id)
    assert small.stored_bytes <= 0.03 * full.stored_bytes
    expected = task_state(client, prefix)
    manager.runtime.delete_task("t")
    manager.recover_from_checkpoint("t")
    assert task_state(client, prefix) == expected


def test_large_change_makes_a_new_keyframe(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    _many(client, layout, 400, version=0, changed=0)
    manager.create_checkpoint("t")
    _many(client, layout, 400, version=1, changed=300)
    second = manager.create_checkpoint("t")
    assert "delta" not in _kinds(manager, second.checkpoint_id)


def test_delta_survives_cleanup_of_its_keyframe_checkpoint(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    _many(client, layout, 300, version=0, changed=0)
    manager.create_checkpoint("t")
    _many(client, layout, 300, version=1, changed=3)
    delta = manager.create_checkpoint("t")
    expected = task_state(client, prefix)
    assert manager.cleanup_old_checkpoints(older_than=timedelta(0)) == 1
    manager.verify_checkpoint(delta.checkpoint_id)  # the keyframe's chunks are still referenced
    manager.runtime.delete_task("t")
    manager.recover_from_checkpoint("t")
    assert task_state(client, prefix) == expected
    _many(client, layout, 300, version=2, changed=3)  # and the next delta builds on it
    assert "delta" in _kinds(manager, manager.create_checkpoint("t").checkpoint_id)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=400_000), max_size=60),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_keyframe_chunks_are_cut_where_a_row_by_row_walk_cuts(sizes: list[int], seed: int) -> None:
    """Chunk names must not depend on how the cut is computed: a chunk ends after a row
    whose digest begins with ten zero bits, or once it holds 1 MiB. The search over all
    digests at once must find exactly the rows a walk row by row finds, however the
    zero bytes fall (across two digests too)."""
    rng = random.Random(seed)
    # Digests that end a chunk, that just do not (the second byte 64), and that hold
    # zero bytes a search could match across a digest boundary.
    starts = [b"\x00\x00", b"\x00\x3f", b"\x00\x40", b"\x01\x00", b"\x00\xff"]
    ends = [b"", b"\x00", b"\x00\x00", b"\x00\x3f"]
    digests = []
    for _ in sizes:
        head = rng.choice(starts) if rng.random() < 0.6 else rng.randbytes(2)
        tail = rng.choice(ends)
        digests.append(head + rng.randbytes(14 - len(tail)) + tail)
    rows = [bytes([i % 251]) * size for i, size in enumerate(sizes)]  # each its own bytes
    expected: list[list[bytes]] = []
    chunk: list[bytes] = []
    size = 0
    for digest, row in zip(digests, rows, strict=True):
        chunk.append(row)
        size += len(row)
        if (digest[0] == 0 and digest[1] < 64) or size >= 1 << 20:
            expected.append(chunk)
            chunk, size = [], 0
    if chunk:
        expected.append(chunk)
    assert [image.ends_chunk(d) for d in digests] == [d[0] == 0 and d[1] < 64 for d in digests]
    assert list(image._chunks(digests, rows)) == [b"".join(c) for c in expected]


def test_keyframe_chunks_refuse_digests_of_another_width() -> None:
    with pytest.raises(ValueError, match="16 bytes each"):
        list(image._chunks([bytes(16), bytes(20)], [b"a", b"b"]))


def _base(*rows: bytes) -> codec.Payload:
    raw = b"".join(rows)
    return codec.Payload("base", codec.digest_of(raw), raw)


def test_decoding_checks_each_row_and_puts_keys_in_order() -> None:
    """Keyframe chunks hold their keys in order; chunks listed out of order still decode
    to the same state, and a row that is not ``[key (bytes), 4 items]`` is refused."""
    rows = [
        msgpack.packb([b"k%d" % i, b"string", b"v%d" % i, False, False], use_bin_type=False)
        for i in range(4)
    ]
    ttl = codec.make_payload("ttl", [1_000, []])
    in_order = image.decode_image([_base(rows[0], rows[1]), _base(rows[2], rows[3]), ttl])
    swapped = image.decode_image([_base(rows[2], rows[3]), _base(rows[0], rows[1]), ttl])
    assert [e.key for e in in_order.entries] == [b"k0", b"k1", b"k2", b"k3"]
    assert swapped.entries == in_order.entries
    assert swapped.runtime_hash == in_order.runtime_hash
    # The key index reads as key -> (row digest, expiry).
    index = in_order.current
    assert list(index) == [b"k0", b"k1", b"k2", b"k3"] and b"k9" not in index
    assert index[b"k0"] == (xxhash.xxh3_128_digest(rows[0]), None) and len(index) == 4
    assert index == swapped.current  # whether or not its positions were looked up
    for bad in (
        msgpack.packb(7),
        msgpack.packb([b"k", b"string", b"v", False]),
        msgpack.packb([7, b"string", b"v", False, False]),
        msgpack.packb([b"k", [b"string"], b"v", False, False]),  # a type name unhashable
        msgpack.packb([b"k", b"hash", {b"f": b"v"}, False, False]),  # a map, not pairs
    ):
        with pytest.raises(CorruptCheckpointError, match="malformed row|row is malformed"):
            image.decode_image([_base(rows[0], bad), ttl])
    # Entries are made when asked for, and then stand for the rows; decoded twice, the
    # same keys compare equal.
    again = image.decode_image([_base(rows[0], rows[1]), _base(rows[2], rows[3]), ttl])
    assert again.rows == in_order.rows and again.rows.rows is again.rows.entries()
    assert repr(again.rows).startswith("DecodedRows(4 keys")


def test_a_ttl_payload_is_read_as_written_or_refused() -> None:
    """Expiries come back as written (ints, a key without a TTL as None); one that is
    not a whole number (a fraction, a boolean), or a key that is not bytes, is refused
    as corrupt."""
    row = msgpack.packb([b"k", b"string", b"v", True, False], use_bin_type=False)
    ttl = codec.make_payload("ttl", [1_000, [[b"k", 61_000], [b"gone", None]]])
    decoded = image.decode_image([_base(row), ttl])
    assert decoded.entries[0].pttl_ms == 60_000
    assert decoded.current[b"k"] == (xxhash.xxh3_128_digest(row), 61_000)
    for pairs in (
        [[b"k", "soon"]],
        [[b"k", 61_000.5]],
        [[b"k", True]],
        [["k", 61_000]],
        [[b"k"]],
        [[b"k", 61_000, 1]],
    ):
        bad = codec.make_payload("ttl", [1_000, pairs])
        with pytest.raises(CorruptCheckpointError, match="TTL payload"):
            image.decode_image([_base(row), bad])


_key_bytes = st.binary(max_size=4).map(lambda b: bytes(x % 4 * 85 for x in b))  # 00 55 aa ff


@settings(max_examples=500, deadline=None)
@given(keys=st.sets(_key_bytes, max_size=8), prefixes=st.lists(_key_bytes, min_size=1, max_size=4))
def test_decoded_rows_tell_whether_every_key_is_under_the_prefixes(
    keys: set[bytes], prefixes: list[bytes]
) -> None:
    """Found by bisection in the sorted keys: the same answer as key by key, for
    prefixes that overlap, repeat, are empty or end in 0xff bytes."""
    ordered = sorted(keys)
    rows = image.DecodedRows(ordered, [None] * len(ordered), [None] * len(ordered), 0)
    assert rows.all_under(prefixes) == all(k.startswith(tuple(prefixes)) for k in ordered)


_expiry = st.one_of(st.none(), st.integers(min_value=0, max_value=200))


@settings(max_examples=300, deadline=None)
@given(
    old=st.lists(st.tuples(st.integers(0, 3), _expiry), min_size=1, max_size=40),
    edits=st.lists(st.tuples(st.integers(0, 4), _expiry), min_size=40, max_size=40),
    limit=st.integers(min_value=1, max_value=40),
)
def test_a_delta_against_the_same_keys_is_found_as_key_by_key(
    old: list[tuple[int, int | None]], edits: list[tuple[int, int | None]], limit: int
) -> None:
    """The position-by-position delta (same keys) gives exactly the key-by-key one:
    the same changed rows, TTL overrides (in key order, with the tolerance) and limit."""
    keys = [b"k%03d" % i for i in range(len(old))]
    old_digests = [b"d%d" % d for d, _ in old]
    old_expiries = [None if x is None else 1_000_000 + x for _, x in old]
    # An edit of 4 keeps the digest; an expiry moves by 0-200 ms (the tolerance is 50).
    new_digests = [
        d if e == 4 else b"d%d" % e for d, (e, _) in zip(old_digests, edits, strict=False)
    ]
    new_expiries = [None if x is None else 1_000_000 + x for _, x in edits[: len(keys)]]
    rows = [k + b"=" + d for k, d in zip(keys, new_digests, strict=True)]
    new = image.RuntimeImage(list(keys), rows, new_digests, new_expiries, 0)
    base = image.KeyIndex(keys, old_digests, old_expiries)
    assert base.same_keys(new.keys)
    fast = image._same_keys_delta(new, base, limit)
    assert fast == image._delta(new, image.KeyIndex(list(keys), old_digests, old_expiries), limit)
    if fast is not None:
        changed, overrides, gone = fast
        assert gone == [] and len(changed) <= limit
        assert [k for k, _ in overrides] == sorted(k for k, _ in overrides)
    moved = image.expiries_moved(base, new)
    slow = any(
        (a is None) != (b is None) or (a is not None and b is not None and abs(a - b) > 50)
        for a, b in zip(old_expiries, new_expiries, strict=True)
    )
    assert moved is slow
    # A key the old index lacks counts as moved, whatever the rest.
    fewer = image.KeyIndex(keys[1:], old_digests[1:], old_expiries[1:])
    assert not fewer.same_keys(new.keys) and image.expiries_moved(fewer, new)


def test_reused_compression_contexts_give_each_thread_exact_payloads() -> None:
    """zstandard contexts are kept per thread and reused: payloads compressed by many
    threads at once, at two levels, each decompress to their own bytes, and a damaged
    payload leaves the context fit for the next one."""
    payloads = [random.Random(seed).randbytes(50_000) * 3 for seed in range(8)]
    expected = {
        (i, level): codec.compress(raw, level) for i, raw in enumerate(payloads) for level in (1, 3)
    }
    failures: list[str] = []

    def work(worker: int) -> None:
        for round_ in range(20):
            i, level = (worker + round_) % len(payloads), (1, 3)[round_ % 2]
            stored = codec.compress(payloads[i], level)
            if stored != expected[i, level]:
                failures.append(f"worker {worker}: payload {i} at level {level} differs")
            if codec.decompress_verified(codec.digest_of(payloads[i]), stored) != payloads[i]:
                failures.append(f"worker {worker}: payload {i} did not round-trip")
            with pytest.raises(CorruptCheckpointError, match="cannot be decompressed"):
                codec.decompress_verified("ab", b"not zstd" + stored)

    def guarded(worker: int) -> None:  # an exception in a thread would otherwise be lost
        try:
            work(worker)
        except BaseException as exc:
            failures.append(f"worker {worker}: {exc!r}")

    threads = [threading.Thread(target=guarded, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    # Contexts are kept for the low levels only: a high level's grows with its payloads.
    stored = codec.compress(payloads[0], 19)
    assert codec.decompress_verified(codec.digest_of(payloads[0]), stored) == payloads[0]
    assert 1 in codec._contexts.compressors and 19 not in codec._contexts.compressors
