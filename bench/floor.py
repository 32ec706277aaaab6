"""The floor: the fastest raw way to do the I/O a checkpoint and a recovery must do.

* capture: find the task's keys and read type, PTTL and value of each (strings by one
  MGET per 1,000 keys, the other types by TYPE and their read command), either
  (``scan+lua``) SCAN from the client then one Lua script per 1,000 keys, all sent
  in one pipeline, or (``lua-all``) one Lua script that SCANs and reads everything;
* create: capture, then write a given number of bytes (taken from the values read,
  cut into 1 MiB blobs) into a fresh SQLite table in one transaction (WAL,
  ``synchronous=NORMAL``, like the store). The floor writes the bytes it read: as
  many as the task's keys and values hold (its raw bytes), as the issue that set the
  targets defines it ("read the same keys and write the same bytes to SQLite in one
  transaction"). ``run.py`` also measures a stricter *I/O floor* that writes only as
  many bytes as our compressed checkpoint stored (about a quarter): a bound no raw
  method can reach, since it would need our compression without its cost;
* recover: read those blobs back, then write the captured keys back to Redis, either
  (``pipeline``) plain SET/RPUSH/HSET/SADD/PEXPIRE pipelined without a transaction,
  one round trip per 1,000 keys, or (``lua``) one Lua script per 1,000 keys, all in
  one pipeline.

Nothing is decoded, verified, hashed or compressed: it is a lower bound, not a
working checkpoint (the keys written back come from the capture in memory).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis

from cfn_checkpoint import KeyLayout

CAPTURE_VARIANTS = ("scan+lua", "lua-all")
RECOVER_VARIANTS = ("pipeline", "lua", "packed")
BATCH_KEYS = 1_000
BLOB_BYTES = 1 << 20

#: Strings are read with one MGET per 1,000 keys (nil for a key of another type, which
#: alone then needs a TYPE): fewer calls a key than TYPE + GET, as the library reads.
_READ = r"""
local function read(key, string_value, out)
  local ty, value = 'string', string_value
  if not value then
    ty = redis.call('TYPE', key)['ok']
    if ty == 'list' then
      value = redis.call('LRANGE', key, 0, -1)
    elseif ty == 'hash' then
      value = redis.call('HGETALL', key)
    elseif ty == 'set' then
      value = redis.call('SMEMBERS', key)
    elseif ty == 'zset' then
      value = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
    else
      value = redis.call('DUMP', key)
    end
  end
  out[#out + 1] = ty
  out[#out + 1] = redis.call('PTTL', key)
  out[#out + 1] = value
end
local function read_all(keys, out)
  for first = 1, #keys, 1000 do
    local last = math.min(first + 999, #keys)
    local strings = redis.call('MGET', unpack(keys, first, last))
    for i = first, last do
      read(keys[i], strings[i - first + 1], out)
    end
  end
end
"""

#: KEYS: keys to read. Returns ``{KEYS, {type1, pttl1, value1, type2, ...}}``.
READ_KEYS = (
    _READ
    + r"""
local out = {}
read_all(KEYS, out)
return {KEYS, out}
"""
)

#: ARGV: pattern, scan count. Returns ``{keys, {type1, pttl1, value1, ...}}``.
READ_ALL = (
    _READ
    + r"""
local keys = {}
local cursor = '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', ARGV[2])
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    keys[#keys + 1] = key
  end
until cursor == '0'
local out = {}
read_all(keys, out)
return {keys, out}
"""
)

#: KEYS: keys to write (at most 1,000). ARGV per key: type, pttl (<= 0: none), n, item1
#: .. itemN. Strings without a TTL go in one MSET, as the library's restore does.
WRITE = r"""
local commands = {list = 'RPUSH', set = 'SADD', hash = 'HSET', zset = 'ZADD'}
local plain, nplain = {}, 0
local a = 1
for i = 1, #KEYS do
  local key = KEYS[i]
  local ty = ARGV[a]
  local pttl = tonumber(ARGV[a + 1])
  local n = tonumber(ARGV[a + 2])
  a = a + 3
  if ty == 'string' then
    if pttl > 0 then
      redis.call('SET', key, ARGV[a], 'PX', pttl)
    else
      plain[nplain + 1] = key
      plain[nplain + 2] = ARGV[a]
      nplain = nplain + 2
    end
  else
    local last = a + n - 1
    local j = a
    while j <= last do
      local k = math.min(j + 999, last)
      redis.call(commands[ty], key, unpack(ARGV, j, k))
      j = k + 1
    end
    if pttl > 0 then
      redis.call('PEXPIRE', key, pttl)
    end
  end
  a = a + n
end
if nplain > 0 then
  redis.call('MSET', unpack(plain, 1, nplain))
end
return #KEYS
"""


@dataclass
class Capture:
    """Raw replies: per batch, the keys and a flat ``[type, pttl, value, ...]`` list."""

    batches: list[tuple[list[bytes], list[Any]]] = field(default_factory=list)

    @property
    def keys(self) -> int:
        return sum(len(keys) for keys, _ in self.batches)


@dataclass(frozen=True, slots=True)
class CreateTiming:
    capture_s: float
    create_s: float
    keys: int
    bytes_written: int


@dataclass(frozen=True, slots=True)
class RecoverTiming:
    recover_s: float
    bytes_read: int
    keys: int


class Floor:
    """The raw read/write paths against one Redis, for one task."""

    def __init__(self, client: redis.Redis, task_id: str) -> None:
        self.client = client
        self.pattern = KeyLayout().scan_pattern(task_id)
        self._read_keys = client.script_load(READ_KEYS)
        self._read_all = client.script_load(READ_ALL)
        self._write = client.script_load(WRITE)

    # -- capture -----------------------------------------------------------------------------

    def capture(self, variant: str) -> Capture:
        """Read every key of the task, raw."""
        if variant == "lua-all":
            keys, flat = self.client.evalsha(self._read_all, 0, self.pattern, 10_000)
            return Capture([(keys, flat)])
        if variant != "scan+lua":
            raise ValueError(variant)
        found = list(self.client.scan_iter(match=self.pattern, count=10_000))
        pipe = self.client.pipeline(transaction=False)
        for start in range(0, len(found), BATCH_KEYS):
            batch = found[start : start + BATCH_KEYS]
            pipe.evalsha(self._read_keys, len(batch), *batch)
        return Capture([(keys, flat) for keys, flat in pipe.execute()])

    # -- create ------------------------------------------------------------------------------

    def create(
        self, variant: str, db: sqlite3.Connection, nbytes: int
    ) -> tuple[CreateTiming, Capture]:
        """Capture, then write ``nbytes`` of the values read into ``db`` in one transaction.

        ``db`` comes from :func:`fresh_db`; only the capture and the write are timed.
        Returns the timing and the capture (for :meth:`recover` to write back).
        """
        start = time.perf_counter()
        capture = self.capture(variant)
        captured = time.perf_counter()
        blobs = blobs_of(capture, nbytes)
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO blobs (data) VALUES (?)", ((b,) for b in blobs))
        db.execute("COMMIT")
        end = time.perf_counter()
        return CreateTiming(captured - start, end - start, capture.keys, nbytes), capture

    # -- recover -----------------------------------------------------------------------------

    def recover(self, variant: str, db: sqlite3.Connection, capture: Capture) -> RecoverTiming:
        """Read the blobs back from ``db``, then write ``capture``'s keys into Redis."""
        start = time.perf_counter()
        read = sum(len(row[0]) for row in db.execute("SELECT data FROM blobs ORDER BY id"))
        if variant == "pipeline":
            self._write_pipelined(capture)
        elif variant == "lua":
            self._write_lua(capture)
        elif variant == "packed":
            self._write_packed(capture)
        else:
            raise ValueError(variant)
        return RecoverTiming(time.perf_counter() - start, read, capture.keys)

    def _write_pipelined(self, capture: Capture) -> None:
        pipe = self.client.pipeline(transaction=False)
        written = 0
        plain: dict[bytes, bytes] = {}  # strings without a TTL: one MSET a batch
        for keys, flat in capture.batches:
            for i, key in enumerate(keys):
                kind, pttl, value = flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]
                if kind == b"string" and pttl <= 0:
                    plain[key] = value
                elif kind == b"string":
                    pipe.set(key, value, px=pttl)
                else:
                    if kind == b"list":
                        pipe.rpush(key, *value)
                    elif kind == b"hash":
                        pipe.hset(key, items=value)
                    elif kind == b"set":
                        pipe.sadd(key, *value)
                    elif kind == b"zset":
                        pipe.execute_command("ZADD", key, *_score_first(value))  # type: ignore[no-untyped-call]
                    else:
                        pipe.restore(key, 0, value, replace=True)
                    if pttl > 0:
                        pipe.pexpire(key, pttl)
                written += 1
                if written % BATCH_KEYS == 0:
                    if plain:
                        pipe.mset(plain)
                        plain = {}
                    pipe.execute()
        if plain:
            pipe.mset(plain)
        pipe.execute()

    def _write_packed(self, capture: Capture) -> None:
        """The pipeline's commands, with no redis-py per command: each packed by hiredis,
        a batch sent as one buffer on one connection and its replies read by one hiredis
        reader (as the library's restore sends its MULTI/EXEC)."""
        conn: Any = self.client.connection_pool.get_connection()
        try:
            commands: list[tuple[Any, ...]] = []
            plain: list[bytes] = []  # strings without a TTL: one MSET a batch
            written = 0
            for keys, flat in capture.batches:
                for i, key in enumerate(keys):
                    kind, pttl, value = flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]
                    if kind == b"string" and pttl <= 0:
                        plain += (key, value)
                    elif kind == b"string":
                        commands.append((b"SET", key, value, b"PX", pttl))
                    else:
                        if kind == b"zset":
                            commands.append((b"ZADD", key, *_score_first(value)))
                        elif kind in _ADD:
                            commands.append((_ADD[kind], key, *value))
                        else:
                            commands.append((b"RESTORE", key, 0, value, b"REPLACE"))
                        if pttl > 0:
                            commands.append((b"PEXPIRE", key, pttl))
                    written += 1
                    if written % BATCH_KEYS == 0:
                        _send(conn, commands, plain)
                        commands, plain = [], []
            _send(conn, commands, plain)
        finally:
            self.client.connection_pool.release(conn)

    def _write_lua(self, capture: Capture) -> None:
        pipe = self.client.pipeline(transaction=False)
        for keys, flat in capture.batches:
            for start in range(0, len(keys), BATCH_KEYS):
                batch = keys[start : start + BATCH_KEYS]
                args: list[Any] = []
                for i in range(start, start + len(batch)):
                    kind, pttl, value = flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]
                    if isinstance(value, bytes):
                        args.extend((kind, pttl, 1, value))
                    else:
                        items = _score_first(value) if kind == b"zset" else value
                        args.extend((kind, pttl, len(items)))
                        args.extend(items)
                pipe.evalsha(self._write, len(batch), *batch, *args)
        pipe.execute()


_ADD = {b"list": b"RPUSH", b"hash": b"HSET", b"set": b"SADD"}


def _send(conn: Any, commands: list[tuple[Any, ...]], plain: list[bytes]) -> None:
    """``commands`` (and an MSET of ``plain``) sent as one buffer; their replies read."""
    if plain:
        commands = [(b"MSET", *plain), *commands]
    if not commands:
        return
    conn.send_packed_command([b"".join(map(hiredis.pack_command, commands))])
    reader = hiredis.Reader()
    got = 0
    while got < len(commands):
        reader.feed(conn._sock.recv(1 << 16))
        reply = reader.gets()
        while reply is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"floor write refused: {reply}")
            got += 1
            reply = reader.gets()


def _score_first(flat: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for i in range(0, len(flat), 2):
        out.extend((flat[i + 1], flat[i]))
    return out


def _value_bytes(capture: Capture) -> Iterator[bytes]:
    for _, flat in capture.batches:
        for value in flat[2::3]:
            if isinstance(value, bytes):
                yield value
            else:
                yield from value


def blobs_of(capture: Capture, nbytes: int) -> list[memoryview]:
    """``nbytes`` of the captured values (repeated if they are fewer), in 1 MiB blobs."""
    parts: list[bytes] = []
    total = 0
    while total < nbytes:
        before = total
        for piece in _value_bytes(capture):
            parts.append(piece)
            total += len(piece)
            if total >= nbytes:
                break
        if total == before:
            raise ValueError("the capture holds no bytes")
    view = memoryview(b"".join(parts))[:nbytes]
    return [view[i : i + BLOB_BYTES] for i in range(0, nbytes, BLOB_BYTES)]


def raw_bytes(capture: Capture) -> int:
    """Key bytes plus value bytes of a capture."""
    keys = sum(len(k) for batch, _ in capture.batches for k in batch)
    return keys + sum(len(v) for v in _value_bytes(capture))


def fresh_db(path: str) -> sqlite3.Connection:
    """A new SQLite file set up like the store (WAL, synchronous NORMAL), with one table."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    return db
