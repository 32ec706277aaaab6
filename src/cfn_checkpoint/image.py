"""Runtime images: a task's keys as packed rows with a digest each, stored as a keyframe
or as a delta against one.

A **row** is the msgpack encoding of ``[key, type, value, has_ttl, native_type or
false]`` (bytes as raw strings), made by the client from what the capture script
read (:func:`packed_rows`); its **digest** is the XXH3-128 of those bytes (16 bytes;
storage format 3 used the SHA-1 in hex, 5-10 times the cost a row). The runtime hash
of a task is the SHA-256 of its row digests in key order, so it does not depend on
how the rows are stored. TTLs tick down, so they are not in the
rows: each key's **expiry instant** (capture clock + TTL left) is kept apart, and an
expiry that did not move is not a change.

A **keyframe** stores every row: ``base`` chunks (a msgpack stream of rows, cut after
rows whose digest begins with ten zero bits, or at 1 MiB) and a ``ttl`` payload
``[captured_at_ms, [[key, expiry], ...]]`` for the keys with a TTL.

A **delta** stores only what differs from a keyframe: it references the keyframe's
``base`` chunks and its ``ttl`` (as ``basettl``) and adds one ``delta`` payload (a
msgpack stream: the removed keys, then the added and changed rows) and its own
``ttl`` payload ``[captured_at_ms, [[key, expiry or None], ...]]`` for keys whose
expiry differs from the keyframe's. A checkpoint that barely changed stores barely
anything, its bookkeeping included (a few manifest rows), and recovery reads the
keyframe plus one delta.
"""

from __future__ import annotations

import binascii
import gc
import hashlib
import importlib
import re
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import ge, is_, itemgetter, lt, methodcaller, ne
from typing import Any, NamedTuple, Protocol, cast

import msgpack
import xxhash

from .codec import Payload, make_payload, stored_payload
from .errors import CorruptCheckpointError, UnreadableFormatError
from .model import FORMAT_VERSION, RedisType, RuntimeEntry
from .pieces import Pieces


class NativeRows(Protocol):
    """The C part of the row codec, ``cfn_checkpoint._rows`` (``_rows.c``), where
    ``pip install`` could compile it. Every function raises ValueError for input it
    does not take, and never reads past the bytes it is given."""

    def scan(self, raw: bytes, offset: int = 0, /) -> tuple[list[bytes], list[bytes]]:
        """The key and the bytes of each row of a msgpack stream of rows, from
        ``offset`` on ("malformed row" for one that is not ``[key (bytes), 4 more]``)."""
        ...

    def classify(self, rows: list[Any], expiries: list[int | None], /) -> list[int]:
        """The indexes of the items that are not plain rows as stored (a string's or
        a list's bytes, no native type) whose TTL flag agrees with their expiry."""
        ...

    def pack(self, flat: list[Any], now_ms: int, /) -> tuple[list[bytes], list[int], list[bytes]]:
        """A capture's rows in key order, packed as :func:`packed_rows` packs them: the
        keys, their expiry instants, the rows (ValueError for a key read twice, an item
        of another type than a capture gives, an expiry beyond 64 bits)."""
        ...

    def restore(
        self,
        rows: list[Any],
        expiries: list[int | None],
        captured_at_ms: int,
        elapsed_locks: int,
        elapsed_others: int,
        lock_prefix: bytes,
        /,
    ) -> tuple[bytes, int, list[int], list[int]]:
        """The RESP of the commands that write the plain rows (as
        :func:`~cfn_checkpoint.runtime.commands.restore_commands` makes them), how
        many commands, the indexes of rows whose TTL ran out, and those of the other
        items."""
        ...


def _native() -> NativeRows | None:
    try:
        module = importlib.import_module(f"{__package__}._rows")
    except ImportError:  # built without a C compiler: the same rows, decoded in Python
        return None
    return cast(NativeRows, module)


#: The C part of the codec, None where it was not built: rows are then decoded into
#: their fields and their commands made and packed in Python.
native: NativeRows | None = _native()

#: A base chunk ends after a row whose digest begins with ten zero bits (one row in
#: 1,024): its first byte zero and its second below 64 (see :func:`ends_chunk`) ...
_CUT = re.compile(rb"\x00[\x00-\x3f]")
#: ... or once it holds this many bytes.
CHUNK_MAX_BYTES = 1 << 20
#: A delta larger than this share of the task's keys makes a new keyframe instead.
MAX_DELTA_SHARE = 0.25
#: An expiry instant that moved by more than this is a change (a renewed TTL); less is
#: rounding between two captures.
EXPIRY_TOLERANCE_MS = 50

_packer = msgpack.Packer(use_bin_type=True)  # for delta headers (removed keys)


RowDigest = Callable[[bytes | memoryview], bytes]

#: A row's digest (formats 4 and 5): its XXH3-128, 16 bytes. A digest only tells changed rows
#: from unchanged ones; what is stored is checked with SHA-256 (payload names, the
#: runtime hash). Per row it costs 0.05-0.08 us against 0.45-0.6 us for SHA-1 in hex
#: (measured on two machines): the calls, not the hashing, dominate for rows of a few
#: hundred bytes.
row_digest: RowDigest = xxhash.xxh3_128_digest
_DIGEST_SIZE = 16


def _sha1_hex(row: bytes | memoryview) -> bytes:
    return binascii.hexlify(hashlib.sha1(row).digest())


#: How the rows of each storage format this version reads are digested.
_DIGESTERS: dict[int, RowDigest] = {3: _sha1_hex, 4: row_digest, 5: row_digest}


def row_digester(format_version: int = FORMAT_VERSION) -> RowDigest:
    """How the rows of a checkpoint in ``format_version`` are digested."""
    try:
        return _DIGESTERS[format_version]
    except KeyError:
        raise UnreadableFormatError(
            f"storage format {format_version} is not one this version reads"
        ) from None


def runtime_hash(digests: Iterable[bytes]) -> str:
    """The hash of a task's runtime keys: SHA-256 over the row digests in key order."""
    return hashlib.sha256(b"".join(digests)).hexdigest()


class Packed(NamedTuple):
    """Keys as rows, column by column (one entry per key, in the same order)."""

    keys: list[bytes]
    #: Each row's digest (:data:`row_digest`).
    digests: list[bytes]
    #: Expiry instant in ms on the capture clock, -1 for none; one already past at the
    #: capture clock counts as that clock (no TTL left).
    expiries: list[int]
    rows: list[bytes]


_row_packer = msgpack.Packer(use_bin_type=False)  # bytes as raw strings, like cmsgpack
_ZEROS = repeat(0)
_FALSES = repeat(False)


_gc_pauses = 0  # sections inside gc_paused(), over all threads
_gc_was_enabled = False
_gc_lock = threading.Lock()


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: building many small acyclic objects (a row,
    an entry per key) otherwise sets off collections that walk every live object.

    The collector is process-wide, so pauses are counted over all threads: it is turned
    back on when the last one ends, and only if it was on when the first one began.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def packed_rows(flat: Sequence[Any], now_ms: int) -> Packed:
    """The rows of the keys the capture scripts read, sorted by key, each key once.

    ``flat`` holds four items a key: ``key, type, expiry, value``, the type
    ``dump:<native type>`` for a DUMP payload, the expiry in ms since the epoch on the
    server clock (-1: none), kept no earlier than ``now_ms``. The row is ``[key,
    type, value, has_ttl, native or false]`` (type ``dump`` and the native type apart)
    packed with msgpack (bytes as raw strings), its digest :data:`row_digest`. Packing
    and hashing here, not in Redis's Lua, costs about a quarter as much. The columns
    are sliced out whole, with no tuple made per key.

    An in-script SCAN may name a key twice (while Redis rehashes), and the script then
    reads it twice, the same value atomically: such a key is kept once.
    """
    if len(flat) % 4:
        raise ValueError(f"a capture reply holds four items a key, not {len(flat)} items")
    if native is not None and type(flat) is list:
        packed = _packed_in_c(native, flat, now_ms)
        if packed is not None:
            return packed
    pack = _row_packer.pack
    with gc_paused():
        keys, types, expiries, values = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
        # One C call a row, no bytecode per key (0.3 ms at 10,000 against a comprehension).
        # The columns are slices of one reply, of one length; the last one never ends.
        flags = map(ge, expiries, _ZEROS)
        rows = list(map(pack, zip(keys, types, values, flags, _FALSES, strict=False)))
        if any(t.startswith(b"dump:") for t in set(types)):  # streams, module types: rare
            for i in compress(range(len(types)), map(methodcaller("startswith", b"dump:"), types)):
                rows[i] = pack([keys[i], b"dump", values[i], expiries[i] >= 0, types[i][5:]])
        # Packed in the order read, then put in key order: three columns to reorder
        # (keys, rows, expiries) rather than four.
        order = sorted(range(len(keys)), key=keys.__getitem__)
        keys = list(map(keys.__getitem__, order))
        if not all(map(lt, keys, keys[1:])):  # a key twice: one position each
            once = dict(zip(keys, order, strict=True))
            keys, order = list(once), list(once.values())
        rows = list(map(rows.__getitem__, order))
        return Packed(
            keys,
            list(map(row_digest, rows)),
            [x if x < 0 or x > now_ms else now_ms for x in map(expiries.__getitem__, order)],
            rows,
        )


def _packed_in_c(c: NativeRows, flat: list[Any], now_ms: int) -> Packed | None:
    """:func:`packed_rows` by the C part of the codec, to the same bytes (10,000 keys:
    4.8 against 8.5 ms, the digests included); None for a key read twice, an item of
    another type than a capture gives or an expiry beyond 64 bits, which are packed
    in Python."""
    try:
        keys, expiries, rows = c.pack(flat, now_ms)
    except (ValueError, OverflowError, TypeError):
        return None
    return Packed(keys, list(map(row_digest, rows)), expiries, rows)


@dataclass(slots=True)
class Snapshot:
    """A task's runtime keys as read at one moment (when ``point_in_time``).

    :attr:`flat` is what the capture scripts returned, in the order they read the keys
    (four items a key: see :func:`packed_rows`). Keys sorted, rows and digests are
    made the first time they are asked for, so an unchanged task, recognised by
    comparing the read with an earlier one, costs no packing, hashing or sorting.

    A read on one server may come with the bytes of its script calls' replies
    (``raw``, one :class:`~cfn_checkpoint.pieces.Pieces` a call): the next read can
    then be compared with them before it is parsed (see
    :mod:`~cfn_checkpoint.runtime.reply`). One found equal holds no items of its own
    (``_flat`` None): they are parsed from ``raw`` if ever asked for.
    """

    task_id: str
    _flat: list[Any] | None
    #: Server clock (ms since the epoch) at the moment of the read.
    captured_at_ms: int
    #: True when all keys were read in one atomic server-side step.
    point_in_time: bool
    #: True when the keys were read one Redis Cluster slot at a time (the reference
    #: layout on a cluster): never point in time.
    node_by_node: bool = False
    #: The bytes of each script reply read, when they were kept (each reply's first
    #: item is the clock of its call, which may differ from ``captured_at_ms``).
    raw: tuple[Pieces, ...] | None = field(default=None, repr=False)
    #: True when every reply was found equal, but for its clock, to the bytes the
    #: capture was told to expect (``raw`` is then those bytes, the same object).
    as_expected: bool = False
    _packed: Packed | None = field(default=None, repr=False)
    _sizes: tuple[int, int, int] | None = field(default=None, repr=False)

    @property
    def flat(self) -> list[Any]:
        """Four items a key, as the capture scripts returned them."""
        if self._flat is None:
            if self.raw is None:
                raise ValueError("a snapshot holds its items or the bytes of its reply")
            self._flat = [item for reply in self.raw for item in reply.parse()[1:]]
        return self._flat

    def share(self, flat: list[Any]) -> None:
        """Hold ``flat``, an equal read kept from before, in place of this read's own."""
        self._flat = flat

    @property
    def kept_as_bytes(self) -> bool:
        """Whether a memo keeps this read as its replies' bytes rather than its items:
        it has them, and it was read in one call (bytes then cost nothing more) or as
        expected (see :meth:`~cfn_checkpoint.memo.CaptureMemo.keep`)."""
        return self.raw is not None and (self.point_in_time or self.as_expected)

    @property
    def has_keys(self) -> bool:
        """Whether any key was read (known without parsing a reply)."""
        if self._flat is None and self.raw is not None:
            # Bytes held unparsed are those of capture replies (each its clock first:
            # see runtime.reply.clock_span), so an array of one item holds the clock alone.
            return not all(reply[0].startswith(b"*1\r\n") for reply in self.raw)
        return bool(self.flat)

    @property
    def packed(self) -> Packed:
        """Every key as a row, in key order."""
        return self._pack() if self._packed is None else self._packed

    @property
    def row_bytes(self) -> int:
        """Bytes of all rows."""
        return self.sizes[0]

    @property
    def sizes(self) -> tuple[int, int, int]:
        """``(bytes of all rows, values that are arrays, items in them)``: what keeping
        the reply as objects costs in memory (see :func:`~cfn_checkpoint.memo.estimate`).
        A snapshot that holds its reply's bytes is kept as those: its arrays are not
        counted (0, 0)."""
        if self._sizes is None:
            self._pack()
        assert self._sizes is not None
        return self._sizes

    def _pack(self) -> Packed:
        flat = self.flat
        # Counted while the reply and the rows are in the caches: later (after they are
        # compressed) the same walks cost several times as much, 1.5 ms at 10,000 keys.
        # The arrays count only for a read kept as items, not as its replies' bytes.
        values = [] if self.kept_as_bytes else flat[3::4]
        lists = list(compress(values, map(is_, map(type, values), repeat(list))))
        packed = packed_rows(flat, self.captured_at_ms)
        self._sizes = (sum(map(len, packed.rows)), len(lists), sum(map(len, lists)))
        self._packed = packed
        return packed

    @property
    def entries(self) -> list[RuntimeEntry]:
        """The keys as entries."""
        packed, at = self.packed, self.captured_at_ms
        return [
            decode_row(row, None if expiry < 0 else expiry - at)
            for expiry, row in zip(packed.expiries, packed.rows, strict=True)
        ]


@dataclass(slots=True)
class RuntimeImage:
    """A task's runtime keys, sorted by key, as rows with digests and expiry instants."""

    keys: list[bytes]
    rows: list[bytes]
    digests: list[bytes]
    expiries: list[int | None]
    captured_at_ms: int
    _index: KeyIndex | None = field(default=None, repr=False)

    @classmethod
    def of(cls, snapshot: Snapshot) -> RuntimeImage:
        """The image of a capture."""
        keys, digests, expiries, rows = snapshot.packed
        with gc_paused():
            instants = [None if x < 0 else x for x in expiries]
            return cls(keys, rows, digests, instants, snapshot.captured_at_ms)

    def runtime_hash(self) -> str:
        """See :func:`runtime_hash`."""
        return runtime_hash(self.digests)

    def index(self) -> KeyIndex:
        """Each key's digest and expiry (this image's own lists; not to be changed)."""
        if self._index is None:
            self._index = KeyIndex(self.keys, self.digests, self.expiries)
        return self._index


@dataclass(slots=True)
class KeyIndex(Mapping[bytes, tuple[bytes, int | None]]):
    """Each key's row digest and expiry instant (ms since the epoch; None: no TTL), read
    as a mapping ``key -> (digest, expiry)``.

    Held as three lists in key order, an image's own (not copied, not to be changed).
    A task's keys seldom change between checkpoints: against an index with the same
    keys, a delta or an expiry check compares the lists position by position, in C.
    Only when the keys differ is a dict ``key -> position`` made (of ints alone, so the
    cyclic collector never walks it): building dicts on every checkpoint cost 1.2 ms
    at 10,000 keys and 13-15 ms at 100,000.
    """

    sorted_keys: list[bytes] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    expiries: list[int | None] = field(default_factory=list)
    _positions: dict[bytes, int] | None = field(default=None, repr=False, compare=False)

    def positions(self) -> dict[bytes, int]:
        """Each key's position in the lists (made once)."""
        if self._positions is None:
            keys = self.sorted_keys
            self._positions = dict(zip(keys, range(len(keys)), strict=True))
        return self._positions

    def same_keys(self, keys: list[bytes]) -> bool:
        """Whether ``keys`` (sorted) are exactly this index's keys."""
        return keys is self.sorted_keys or keys == self.sorted_keys

    def __len__(self) -> int:
        return len(self.sorted_keys)

    def __getitem__(self, key: bytes) -> tuple[bytes, int | None]:
        i = self.positions()[key]
        return self.digests[i], self.expiries[i]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.sorted_keys)

    def __contains__(self, key: object) -> bool:
        return key in self.positions()


@dataclass(slots=True)
class Keyframe:
    """What a delta needs of its keyframe: payload names and each key's digest and expiry."""

    chunks: list[str]
    ttl: str
    index: KeyIndex = field(default_factory=KeyIndex)


def ends_chunk(digest: bytes) -> bool:
    """Whether a base chunk ends after the row of this digest: one that begins with ten
    zero bits (one row in 1,024). A chunk also ends once it holds
    :data:`CHUNK_MAX_BYTES`. Rows, not keys, decide: the same rows give the same cuts,
    so unchanged chunks keep their names from one keyframe to the next, and the
    digests are at hand (testing each key, with CRC32, cost 1 ms at 10,000)."""
    return digest[0] == 0 and digest[1] < 64


def _chunks(digests: list[bytes], rows: list[bytes]) -> Iterator[bytes]:
    """``rows`` cut after each row whose digest :func:`ends_chunk`, or once a chunk holds
    :data:`CHUNK_MAX_BYTES`. Each chunk comes as its rows joined (joined first: the size
    check is then free). The cuts are found in one regular-expression search over the
    digests joined (16 bytes each), not a call a row."""
    width = _DIGEST_SIZE
    joined = b"".join(digests)
    if len(joined) != width * len(digests):
        raise ValueError(f"row digests are {width} bytes each")
    cuts = []
    for at in map(_start, _CUT.finditer(joined)):  # about one match in 64 digests
        offset = at % width
        if not offset:
            cuts.append(at // width + 1)
        elif offset == width - 1 and not joined[at + 1] and joined[at + 2] < 64:
            # This match took the zero byte a digest begins with: a search resumes after
            # a match (a lookahead finding every one cost ten times as much).
            cuts.append(at // width + 2)
    if not cuts or cuts[-1] != len(rows):
        cuts.append(len(rows))
    start = 0
    for end in cuts:
        chunk = rows[start:end]
        raw = b"".join(chunk)
        if len(raw) >= CHUNK_MAX_BYTES:  # rare: cut by size as well
            part: list[bytes] = []
            size = 0
            for row in chunk:
                part.append(row)
                size += len(row)
                if size >= CHUNK_MAX_BYTES:
                    yield b"".join(part)
                    part, size = [], 0
            raw = b"".join(part)
        if raw:
            yield raw
        start = end


def keyframe_payloads(image: RuntimeImage, level: int) -> tuple[list[Payload], Keyframe]:
    """The ``base`` chunks (compressed at ``level`` and named by their stored bytes: see
    :func:`~cfn_checkpoint.codec.stored_payload`) and ``ttl`` payload of a keyframe, and
    its :class:`Keyframe`."""
    payloads = [stored_payload("base", raw, level) for raw in _chunks(image.digests, image.rows)]
    expiring = [[k, x] for k, x in zip(image.keys, image.expiries, strict=True) if x is not None]
    ttl = make_payload("ttl", [image.captured_at_ms, expiring])
    payloads.append(ttl)
    frame = Keyframe([p.digest for p in payloads if p.kind == "base"], ttl.digest, image.index())
    return payloads, frame


def delta_payloads(image: RuntimeImage, frame: Keyframe) -> list[tuple[str, str, Payload | None]]:
    """The manifest of a delta against ``frame``: ``(kind, digest, new payload or None)``.

    Returns an empty list when the delta would be larger than :data:`MAX_DELTA_SHARE`
    of the task: a keyframe is then the better choice.
    """
    base = frame.index
    limit = max(1, int(MAX_DELTA_SHARE * max(len(image.keys), len(base))))
    if base.same_keys(image.keys):
        found = _same_keys_delta(image, base, limit)
    else:
        found = _delta(image, base, limit)
    if found is None:
        return []
    changed, overrides, gone = found
    delta = _raw_payload("delta", _packer.pack(gone) + b"".join(changed))
    ttl = make_payload("ttl", [image.captured_at_ms, overrides])
    manifest: list[tuple[str, str, Payload | None]] = [("base", d, None) for d in frame.chunks]
    manifest += [
        ("basettl", frame.ttl, None),
        ("delta", delta.digest, delta),
        ("ttl", ttl.digest, ttl),
    ]
    return manifest


_Delta = tuple[list[bytes], list[list[object]], list[bytes]]


def _same_keys_delta(image: RuntimeImage, base: KeyIndex, limit: int) -> _Delta | None:
    """``(changed rows, TTL overrides, removed keys)`` against an index of the same keys,
    found position by position; None past ``limit`` changed rows."""
    positions = range(len(image.keys))
    differs = list(map(ne, image.digests, base.digests))
    changed_at = list(compress(positions, differs))
    if len(changed_at) > limit:
        return None
    keys, expiries, old = image.keys, image.expiries, base.expiries
    overriding = [i for i in changed_at if expiries[i] is not None]
    overriding += [
        i
        for i in compress(positions, map(ne, expiries, old))
        if not differs[i] and _moved(old[i], expiries[i])
    ]
    overriding.sort()
    rows = image.rows
    return [rows[i] for i in changed_at], [[keys[i], expiries[i]] for i in overriding], []


def _delta(image: RuntimeImage, base: KeyIndex, limit: int) -> _Delta | None:
    """As :func:`_same_keys_delta`, for keys that differ: key by key."""
    where, base_digests, base_expiries = base.positions(), base.digests, base.expiries
    changed: list[bytes] = []
    overrides: list[list[object]] = []
    seen = 0
    for key, row, digest, expiry in zip(
        image.keys, image.rows, image.digests, image.expiries, strict=True
    ):
        i = where.get(key)
        if i is None or base_digests[i] != digest:  # new, or changed
            changed.append(row)
            if expiry is not None:
                overrides.append([key, expiry])
        elif _moved(base_expiries[i], expiry):
            overrides.append([key, expiry])
        if i is not None:
            seen += 1
        if len(changed) > limit:
            return None
    removed = len(base) - seen
    if removed + len(changed) > limit:
        return None
    present = set(image.keys) if removed else ()
    gone = [k for k in base.sorted_keys if k not in present] if removed else []
    return changed, overrides, gone


def _moved(old: int | None, new: int | None) -> bool:
    if old is None or new is None:
        return old is not new
    return abs(old - new) > EXPIRY_TOLERANCE_MS


def expiries_moved(old: KeyIndex, image: RuntimeImage) -> bool:
    """Whether any key's expiry instant differs from ``old`` (or a key is not in it)."""
    before, now = old.expiries, image.expiries
    if old.same_keys(image.keys):
        differs = compress(range(len(now)), map(ne, before, now))
        return any(_moved(before[i], now[i]) for i in differs)
    where = old.positions()
    for key, expiry in zip(image.keys, now, strict=True):
        i = where.get(key)
        if i is None or _moved(before[i], expiry):
            return True
    return False


def _raw_payload(kind: str, raw: bytes) -> Payload:
    return Payload(kind, hashlib.sha256(raw).hexdigest(), raw)


# -- decoding --------------------------------------------------------------------------------


def _rows(
    digest: str,
    raw: bytes,
    first_is_header: bool = False,
    digester: RowDigest = row_digest,
) -> tuple[object, list[Any], list[bytes], list[bytes]]:
    """The objects of a msgpack stream of rows: ``(header, rows, their keys, the digest of
    each row's bytes)``. Raises if a row is not ``[key (bytes), 4 more items]``."""
    unpacker = _unpacker(raw)
    header: object = None
    objs: list[Any] = []
    ends: list[int] = []
    append, end, tell, view = objs.append, ends.append, unpacker.tell, memoryview(raw)
    try:
        unpacker.feed(raw)
        if first_is_header:
            header = unpacker.unpack()
        start = tell()
        for obj in unpacker:
            append(obj)
            end(tell())
    except Exception as exc:  # msgpack raises several unrelated types
        raise CorruptCheckpointError(f"payload {digest[:12]} cannot be decoded: {exc}") from exc
    # Checked a column at a time: a Python call per row costs more than the checks.
    if set(map(type, objs)) - {list} or set(map(len, objs)) - {5}:
        raise CorruptCheckpointError(f"payload {digest[:12]} holds a malformed row")
    keys = list(map(_first, objs))
    if set(map(type, keys)) - {bytes}:
        raise CorruptCheckpointError(f"payload {digest[:12]} holds a malformed row")
    starts = [start, *ends[:-1]] if ends else []
    digests = [digester(view[a:b]) for a, b in zip(starts, ends, strict=True)]
    return header, objs, keys, digests


_first = itemgetter(0)
_start = methodcaller("start")


def _unpacker(raw: bytes) -> msgpack.Unpacker:
    """An unpacker for a payload of rows: its buffer as large as the payload (by
    default msgpack refuses more than 100 MiB, and a row may hold a larger value)."""
    return msgpack.Unpacker(
        raw=True, strict_map_key=False, use_list=True, max_buffer_size=max(len(raw), 1)
    )


def _row_bytes(
    digest: str,
    raw: bytes,
    first_is_header: bool = False,
    digester: RowDigest = row_digest,
) -> tuple[object, list[Any], list[bytes], list[bytes]]:
    """As :func:`_rows`, but each row comes as its bytes, cut by the C part of the
    codec (:data:`native`): no Python object is made of its fields (10,000 keys: 1.7
    against 5.2 ms, digests included). The header is decoded in Python."""
    assert native is not None
    header: object = None
    offset = 0
    try:
        if first_is_header:
            unpacker = _unpacker(raw)
            unpacker.feed(raw)
            header = unpacker.unpack()
            offset = unpacker.tell()
        keys, rows = native.scan(raw, offset)
    except ValueError as exc:
        if str(exc) == "malformed row":
            raise CorruptCheckpointError(f"payload {digest[:12]} holds a malformed row") from exc
        raise CorruptCheckpointError(f"payload {digest[:12]} cannot be decoded: {exc}") from exc
    except Exception as exc:  # msgpack raises several unrelated types
        raise CorruptCheckpointError(f"payload {digest[:12]} cannot be decoded: {exc}") from exc
    return header, rows, keys, list(map(digester, rows))


def _as_list(row: Any) -> Any:
    """A row as stored, its bytes (see :func:`_row_bytes`) decoded; anything else as it is."""
    if row.__class__ is not bytes:
        return row
    try:
        return msgpack.unpackb(row, raw=True, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CorruptCheckpointError(f"a row cannot be decoded: {exc}") from exc


#: What an expiry in a TTL payload may be: a whole number of ms, or None (no TTL).
_EXPIRY_TYPES = {int, type(None)}


def _unpack_ttl(digest: str, raw: bytes) -> tuple[int, dict[bytes, int | None]]:
    """A TTL payload's capture clock and ``key -> expiry``. The pairs make the dict as
    they are, checked a column at a time (a Python step a pair cost 0.7 against 0.5 ms
    for 2,500 keys)."""
    try:
        captured_at, pairs = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        expiries: dict[bytes, int | None] = dict(pairs)
        if set(map(type, expiries)) - {bytes} or set(map(type, expiries.values())) - _EXPIRY_TYPES:
            raise ValueError("a key that is not bytes, or an expiry that is not a whole number")
        return int(captured_at), expiries
    except Exception as exc:
        raise CorruptCheckpointError(f"TTL payload {digest[:12]} cannot be decoded: {exc}") from exc


class DecodedRows:
    """A task's runtime keys decoded from a checkpoint, in key order: each a row as
    stored if it is a plain string or list, else its entry (made, and so checked, as
    it was decoded), with each key's expiry instant. A row as stored is its bytes when
    the C part of the codec (:data:`native`) cut it, else its fields decoded (``[key,
    type, value, has TTL, False]``). Entries are made of them when first asked for,
    and then replace the rows: a recovery writes the rows as they are
    (:func:`~cfn_checkpoint.runtime.commands.restore_commands`), which at 10,000 keys
    saves making an entry a key (4-7 ms), and writing them from their bytes saves
    making their commands and packing them again (about 10 ms)."""

    __slots__ = ("keys", "rows", "expiries", "captured_at_ms", "_entries", "_ordered")

    def __init__(
        self,
        keys: list[bytes],
        rows: list[Any],
        expiries: list[int | None],
        captured_at_ms: int,
    ) -> None:
        self.keys = keys
        self.rows = rows
        self.expiries = expiries
        self.captured_at_ms = captured_at_ms
        self._entries: list[RuntimeEntry] | None = None
        self._ordered: bool | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DecodedRows):
            return NotImplemented
        same_clock = self.captured_at_ms == other.captured_at_ms
        return same_clock and self.entries() == other.entries()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DecodedRows({len(self)} keys, captured_at_ms={self.captured_at_ms})"

    def slice(self, start: int, stop: int) -> DecodedRows:
        """The rows from ``start`` up to ``stop``, as rows of their own."""
        return DecodedRows(
            self.keys[start:stop],
            self.rows[start:stop],
            self.expiries[start:stop],
            self.captured_at_ms,
        )

    def pick(self, indexes: Iterable[int]) -> DecodedRows:
        """The rows at ``indexes`` (in the order given), as rows of their own."""
        at = list(indexes)
        return DecodedRows(
            list(map(self.keys.__getitem__, at)),
            list(map(self.rows.__getitem__, at)),
            list(map(self.expiries.__getitem__, at)),
            self.captured_at_ms,
        )

    def dumps(self) -> list[RuntimeEntry]:
        """The entries held as DUMP payloads (never a plain row)."""
        return [row for row in self.rows if row.__class__ not in _AS_STORED and row.type is _DUMP]

    def in_order(self) -> bool:
        """Whether the keys are in strictly ascending order, so unique (always, as
        decoded; rows made otherwise are checked key by key)."""
        if self._ordered is None:
            keys = self.keys
            self._ordered = all(map(lt, keys, keys[1:]))
        return self._ordered

    def all_under(self, prefixes: Iterable[bytes]) -> bool:
        """Whether every key starts with one of ``prefixes``: found by bisection in the
        sorted keys, not key by key (False when the keys are not in order)."""
        if not self.in_order():
            return False
        wanted = set(prefixes)
        outer = [p for p in wanted if not any(p != q and p.startswith(q) for q in wanted)]
        keys, covered = self.keys, 0
        for prefix in outer:  # their ranges of keys do not overlap
            first = bisect_left(keys, prefix)
            end = _after(prefix)
            covered += (len(keys) if end is None else bisect_left(keys, end, first)) - first
        return covered == len(keys)

    def entries(self) -> list[RuntimeEntry]:
        """The keys as entries (made once; they then stand for the rows too, so the
        plain rows are not kept beside them)."""
        if self._entries is None:
            with gc_paused():
                self._entries = self._make_entries()
            self.rows = self._entries
        return self._entries

    def _make_entries(self) -> list[RuntimeEntry]:
        at = self.captured_at_ms
        return [
            plain_entry(row, expiry, at) if row.__class__ in _AS_STORED else row
            for row, expiry in zip(self.rows, self.expiries, strict=True)
        ]


#: What a plain row as stored is, in :class:`DecodedRows`: its bytes, or its fields.
_AS_STORED = (bytes, list)


def plain_entry(row: list[Any] | bytes, expiry: int | None, captured_at_ms: int) -> RuntimeEntry:
    """A plain string's or list's row, as :class:`DecodedRows` keeps it, as an entry."""
    fields = _as_list(row)
    pttl = None if expiry is None else expiry - captured_at_ms
    return tuple.__new__(RuntimeEntry, (fields[0], PLAIN_TYPES[fields[1]], fields[2], pttl, None))


def _after(prefix: bytes) -> bytes | None:
    """The least bytes greater than every bytes starting with ``prefix`` (None: no
    such bytes, for a prefix of 0xff bytes alone)."""
    kept = prefix.rstrip(b"\xff")
    return kept[:-1] + bytes((kept[-1] + 1,)) if kept else None


@dataclass(slots=True)
class DecodedImage:
    """Rows rebuilt from stored payloads, the hash of their rows, and the keyframe."""

    rows: DecodedRows
    captured_at_ms: int
    runtime_hash: str
    keyframe: Keyframe
    current: KeyIndex

    @property
    def entries(self) -> list[RuntimeEntry]:
        """The keys as entries."""
        return self.rows.entries()


def decode_image(payloads: Sequence[Payload], format_version: int = FORMAT_VERSION) -> DecodedImage:
    """Rebuild a task's runtime keys (as :class:`DecodedRows`) from a checkpoint's
    runtime payloads (verified), stored in ``format_version``."""
    with gc_paused():
        return _decode_image(payloads, row_digester(format_version))


def _decode_image(payloads: Sequence[Payload], digester: RowDigest) -> DecodedImage:
    by_kind: dict[str, list[Payload]] = {}
    for p in payloads:
        by_kind.setdefault(p.kind, []).append(p)
    objs: list[Any] = []
    keys: list[bytes] = []
    digests: list[bytes] = []
    cut = _rows if native is None else _row_bytes
    for chunk in by_kind.get("base", []):
        _, chunk_objs, chunk_keys, chunk_digests = cut(chunk.digest, chunk.raw, False, digester)
        objs += chunk_objs
        keys += chunk_keys
        digests += chunk_digests
    try:
        (ttl,) = by_kind["ttl"]
        delta_list = by_kind.get("delta", [])
        basettl_list = by_kind.get("basettl", [])
        if len(delta_list) != len(basettl_list) or len(delta_list) > 1:
            raise ValueError("delta and basettl come together, once")
    except (KeyError, ValueError) as exc:
        raise CorruptCheckpointError(f"malformed runtime manifest: {exc}") from exc
    captured_at, own = _unpack_ttl(ttl.digest, ttl.raw)
    if delta_list:
        rows = dict(zip(keys, zip(objs, digests, strict=True), strict=True))
        _, base_expiry = _unpack_ttl(basettl_list[0].digest, basettl_list[0].raw)
        base_index = KeyIndex(keys, digests, list(map(base_expiry.get, keys)))
        expiries = dict(base_expiry)
        delta = delta_list[0]
        header, changed, changed_keys, changed_digests = cut(
            delta.digest, delta.raw, True, digester
        )
        if not isinstance(header, list):
            raise CorruptCheckpointError(f"payload {delta.digest[:12]} is malformed")
        for key in header:
            rows.pop(bytes(key), None)
            expiries.pop(bytes(key), None)
        for key, obj, digest in zip(changed_keys, changed, changed_digests, strict=True):
            rows[key] = (obj, digest)
            expiries.pop(key, None)
        expiries.update(own)
        frame = Keyframe(
            [p.digest for p in by_kind.get("base", [])],
            basettl_list[0].digest,
            base_index,
        )
        keys, objs, digests = _sorted_rows(rows)
    else:
        expiries = own
        # A keyframe's index is its own state: filled in below, as ``current``.
        frame = Keyframe([p.digest for p in by_kind.get("base", [])], ttl.digest)
        if not all(map(lt, keys, keys[1:])):  # chunks hold keys in order: never, unless
            keys, objs, digests = _sorted_rows(  # damaged (a key twice: the last wins)
                dict(zip(keys, zip(objs, digests, strict=True), strict=True))
            )
    instants = list(map(expiries.get, keys))
    # Most rows are plain strings and lists, kept as they are; the others are made
    # entries now, which checks them.
    if native is None:
        simple = PLAIN_TYPES
        odd: Iterable[int] = (
            i
            for i, (obj, expiry) in enumerate(zip(objs, instants, strict=True))
            if obj[4] is not False or obj[3] is not (expiry is not None) or obj[1] not in simple
        )
    else:
        odd = native.classify(objs, instants)
    try:
        for i in odd:
            expiry = instants[i]
            objs[i] = entry_of(_as_list(objs[i]), None if expiry is None else expiry - captured_at)
    except TypeError as exc:  # a type name that cannot be looked up
        raise CorruptCheckpointError(f"a row is malformed: {exc}") from exc
    current = KeyIndex(keys, digests, instants)
    if not delta_list:
        frame.index = current
    decoded = DecodedRows(keys, objs, instants, captured_at)
    return DecodedImage(decoded, captured_at, runtime_hash(digests), frame, current)


def _sorted_rows(
    rows: dict[bytes, tuple[Any, bytes]],
) -> tuple[list[bytes], list[Any], list[bytes]]:
    """``key -> (row, digest)`` as three lists in key order."""
    ordered = sorted(rows.items())
    return (
        [key for key, _ in ordered],
        [row for _, (row, _) in ordered],
        [digest for _, (_, digest) in ordered],
    )


_TYPES_RAW = {t.value.encode(): t for t in RedisType}
#: Types whose row value is the entry's value as it is (no pairs to build or sort).
PLAIN_TYPES = {b"string": RedisType.STRING, b"list": RedisType.LIST}
_DUMP = RedisType.DUMP


def _pairs(flat: list[Any]) -> list[tuple[Any, Any]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def entry_of(obj: list[Any], pttl: int | None) -> RuntimeEntry:
    """A row (decoded, strings as bytes) as an entry with the given TTL left."""
    try:
        return _entry_of(obj, pttl)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
        raise CorruptCheckpointError(f"a row is malformed: {exc}") from exc


def _entry_of(obj: list[Any], pttl: int | None) -> RuntimeEntry:
    key, type_name, value, has_ttl, native = obj
    rtype = _TYPES_RAW.get(type_name)
    if rtype is None:
        raise CorruptCheckpointError(f"key {key!r} has unknown type {type_name!r}")
    if has_ttl and pttl is None:
        raise CorruptCheckpointError(f"key {key!r} has a TTL but no expiry")
    if rtype is RedisType.HASH:
        value = sorted(_pairs(value))
    elif rtype is RedisType.ZSET:
        value = _pairs(value)
    elif rtype is RedisType.SET:
        value = sorted(value)
    native_name = native.decode() if isinstance(native, bytes) else None
    return RuntimeEntry(key, rtype, value, pttl if has_ttl else None, native_name)


def decode_row(row: bytes, pttl: int | None) -> RuntimeEntry:
    """One row as captured (its TTL left comes apart: rows hold only whether there is one)."""
    try:
        obj = msgpack.unpackb(row, raw=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CorruptCheckpointError(f"a row cannot be decoded: {exc}") from exc
    return entry_of(obj, None if pttl is None or pttl < 0 else pttl)
