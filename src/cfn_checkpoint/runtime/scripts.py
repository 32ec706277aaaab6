"""Lua scripts run inside Redis. Each one runs atomically: no other client sees a half-step.

Scripts touch only the keys given in KEYS, so they work unchanged on Redis Cluster when
those keys share a slot (the cluster layout's hash tag), with two exceptions for a single
server only: CAPTURE_SCAN, and RESTORE given a scan pattern, look for the task's keys with
SCAN. On a cluster the task's keys are listed by SLOT_KEYS instead (and RESTORE can check
that list is still whole with its ``slot`` guard): ``CLUSTER GETKEYSINSLOT`` only names
keys, it touches none. All use only commands of Redis 6.2, so a checkpoint restores onto
6.2 and 7.x alike.
"""

from __future__ import annotations

#: Lua: ``read_all(keys)`` appends ``key, type, expiry, value`` for each key to ``out``
#: (a flat array: four items a key, after ``out[1]``, the clock), nothing for a key that
#: is gone. Strings (most keys) are read with one MGET per 1,000 keys: MGET gives nil
#: for a key of another type, and only those need a TYPE. Measured at 10,000 keys, that
#: takes 16% off the script (47.6 -> 39.8 ms), a TYPE and a GET call fewer a string. A
#: Redis user denied MGET (an ACL) is read key by key instead, with TYPE and GET: the
#: first MGET tells, and is not sent again. value is a bulk string (string; DUMP
#: payload, type ``dump:<its type>``, for any type other than string/list/hash/set/zset)
#: or a flat array (list items; set members, sorted; hash field, value, ... sorted by
#: field; zset member, score, ... in rank order). The native type rides in the type of
#: the few DUMP keys rather than as a fifth item (nil for all the others): measured at
#: 10,000 keys, 4% off the script and its parsing.
#: expiry is the instant the key expires, in ms on the server clock (-1: none), so an
#: unchanged key reads the same every time. The client packs each key into its row and
#: hashes it: measured here, packing and hashing in Lua (its cmsgpack and SHA-1) cost
#: about 4 us a key, in the client about 1 us. One flat array rather than one per key
#: is cheaper to build here and to parse in the client.
_ROW = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local has_expiretime = nil
local has_mget = nil
local out = {now}
local nout = 1
local function read(key, string_value)
  local ty, value = 'string', string_value
  if not value then
    ty = redis.call('TYPE', key)['ok']
    if ty == 'none' then
      return
    elseif ty == 'string' then
      value = redis.call('GET', key)  -- MGET was not allowed
    elseif ty == 'list' then
      value = redis.call('LRANGE', key, 0, -1)
    elseif ty == 'hash' then
      -- Sorted by field, so the same hash always packs to the same row whatever the
      -- order Redis keeps it in.
      local flat = redis.call('HGETALL', key)
      local fields = {}
      for i = 1, #flat, 2 do
        fields[#fields + 1] = {flat[i], flat[i + 1]}
      end
      table.sort(fields, function(a, b) return a[1] < b[1] end)
      value = {}
      for _, pair in ipairs(fields) do
        value[#value + 1] = pair[1]
        value[#value + 1] = pair[2]
      end
    elseif ty == 'set' then
      value = redis.call('SMEMBERS', key)
      table.sort(value)
    elseif ty == 'zset' then
      value = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
    else
      value = redis.call('DUMP', key)
      ty = 'dump:' .. ty
    end
  end
  -- PEXPIRETIME (7.0+) gives the exact expiry instant; PTTL (6.2) is measured when
  -- this key is read, up to the script's run time after ``now``. The first key tells
  -- whether PEXPIRETIME exists; an older server is then not sent one failing command
  -- per key (each would count in its error statistics).
  local at
  if has_expiretime then
    at = redis.call('PEXPIRETIME', key)
  elseif has_expiretime == nil then
    at = redis.pcall('PEXPIRETIME', key)
    has_expiretime = type(at) ~= 'table'
  end
  if not has_expiretime then
    at = redis.call('PTTL', key)
    if at >= 0 then
      at = now + at
    end
  end
  out[nout + 1] = key
  out[nout + 2] = ty
  out[nout + 3] = at
  out[nout + 4] = value
  nout = nout + 4
end
local function read_all(keys)
  for first = 1, #keys, 1000 do
    local last = math.min(first + 999, #keys)
    local strings = {}
    if has_mget ~= false then
      local got = redis.pcall('MGET', unpack(keys, first, last))
      has_mget = got['err'] == nil
      if has_mget then
        strings = got
      end
    end
    for i = first, last do
      read(keys[i], strings[i - first + 1])
    end
  end
end
"""

#: Lua: ``prefixes(first)`` -> ``wanted, lengths``: ARGV[first], ARGV[first + 1], ... (a
#: task's exact prefixes) as a set, and the one or two lengths they have
#: (agent/swarm/queue, lock), so a key is tested with one lookup per length, not one
#: comparison per prefix (``add_task_keys`` keeps a page's keys that start with one).
#: ``task_keys(pattern, count, wanted, lengths)`` -> the keys SCAN finds for
#: ``pattern`` that start with one of the prefixes. SCAN may name a key
#: twice (while Redis rehashes); the callers cope, which is cheaper than a Lua table of
#: the keys seen (measured: about 1 us a key). It walks the whole keyspace inside the
#: script, so it blocks Redis for as long: callers use it only on databases below a
#: limit (``scan_in_script_max_keys`` for a capture, ``exact_scan_max_keys`` for a
#: restore).
_TASK_KEYS = r"""
-- A command that an ACL may deny a user: the error then names it (Redis does not).
local function checked(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply['err'] then
    local message = reply['err'] .. ' (' .. (...) .. ')'
    if redis.REDIS_VERSION_NUM then  -- 7.0 on: the message as it is
      error({err = message})
    end
    error(message)  -- 6.2 raises strings only (a table loses the message)
  end
  return reply
end
local function prefixes(first)
  local wanted, lengths, seen_length = {}, {}, {}
  for p = first, #ARGV do
    wanted[ARGV[p]] = true
    if not seen_length[#ARGV[p]] then
      seen_length[#ARGV[p]] = true
      lengths[#lengths + 1] = #ARGV[p]
    end
  end
  return wanted, lengths
end
-- Appends to keys (holding n) those of page that start with a wanted prefix; the new n.
local function add_task_keys(page, wanted, lengths, keys, n)
  for _, key in ipairs(page) do
    for i = 1, #lengths do
      if wanted[string.sub(key, 1, lengths[i])] then
        n = n + 1
        keys[n] = key
        break
      end
    end
  end
  return n
end
local function task_keys(pattern, count, wanted, lengths)
  local keys = {}
  local n = 0
  local cursor = '0'
  repeat
    local page = checked('SCAN', cursor, 'MATCH', pattern, 'COUNT', count)
    cursor = page[1]
    n = add_task_keys(page[2], wanted, lengths, keys, n)
  until cursor == '0'
  return keys
end
"""

#: Lua: ``slot_keys(first)`` -> the keys in the slot of KEYS[1] that start with one of
#: ARGV[first], ARGV[first + 1], ... (a task's exact prefixes). Redis Cluster only; it costs
#: as much as the slot holds, which under the cluster layout is about the task itself.
_SLOT_KEYS = r"""
local function slot_keys(first)
  local slot = redis.call('CLUSTER', 'KEYSLOT', KEYS[1])
  local n = redis.call('CLUSTER', 'COUNTKEYSINSLOT', slot)
  local keys = {}
  for _, key in ipairs(redis.call('CLUSTER', 'GETKEYSINSLOT', slot, n)) do
    for p = first, #ARGV do
      if string.sub(key, 1, #ARGV[p]) == ARGV[p] then
        keys[#keys + 1] = key
        break
      end
    end
  end
  return keys
end
"""

#: List a task's keys on Redis Cluster, in one step on the node serving the task's slot.
#: KEYS: one key in that slot (the task's hash tag, ``{<task>}``; it need not exist).
#: ARGV: the task's key prefixes.  Returns the task's keys in that slot (unsorted).
SLOT_KEYS = (
    _SLOT_KEYS
    + r"""
return slot_keys(1)
"""
)

#: The server clock in ms since the epoch. KEYS: none, or one key (on Redis Cluster: a key
#: in the slot whose node's clock is wanted).
CLOCK = r"""
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: Lua: ``undeclared(first)`` -> the keys of the slot of KEYS[1] that start with one of
#: ARGV[first], ... and are not in KEYS: keys of the task the caller did not list.
_UNDECLARED = r"""
local function undeclared(first)
  local declared = {}
  for i = 1, #KEYS do
    declared[KEYS[i]] = true
  end
  local out = {}
  for _, key in ipairs(slot_keys(first)) do
    if not declared[key] then
      out[#out + 1] = key
    end
  end
  return out
end
"""

#: Read keys atomically.
#: KEYS: the keys to read.  ARGV: none, or ``slot, prefix1, prefix2, ...``: with ``slot``
#: (Redis Cluster, all KEYS in one slot) the read is refused, as ``{now_ms, -1, {key,
#: ...}}``, if that slot holds keys with one of the prefixes that are not in KEYS: the
#: task's keys the caller missed.
#: Returns ``{now_ms, <read(KEYS[1])>, <read(KEYS[2])>, ...}``: four items a key, keys
#: that are gone left out.
CAPTURE = (
    _ROW
    + _SLOT_KEYS
    + _UNDECLARED
    + r"""
if ARGV[1] == 'slot' then
  local missed = undeclared(2)
  if #missed > 0 then
    return {now, -1, missed}
  end
end
read_all(KEYS)
return out
"""
)

#: Find and read a task's keys in one atomic step (standalone Redis only: it reads keys
#: not declared in KEYS), if that is cheap enough.
#: KEYS: none.  ARGV: ``pattern, max_keys, scan_count, cheap, sample, prefix1, prefix2,
#: ...``; a key is the task's if it starts with one of the prefixes (the pattern may
#: match more). The scan walks the whole database, so it runs only while DBSIZE is at
#: most ``cheap`` (-1: whatever the size), or, when ``sample`` > 0 (a task of unknown
#: size), at most twice the task's keys estimated from the first page of an
#: unfiltered SCAN of ``sample`` keys (the task's share of them, times DBSIZE: the
#: page is spread over the hash table, so over the keyspace). Asked here rather than
#: by the client, the size and the sample cost no round trips, and the page of keys
#: is not sent.
#: Returns ``{now_ms, -2, dbsize}`` when the scan would cost too much (nothing read),
#: ``{now_ms, -1, n}`` when more than max_keys keys match (nothing read), else
#: ``{now_ms, <read(key1)>, <read(key2)>, ...}`` (a key SCAN named twice is read twice).
CAPTURE_SCAN = (
    _ROW
    + _TASK_KEYS
    + r"""
local wanted, lengths = prefixes(6)
local cheap = tonumber(ARGV[4])
local size = cheap >= 0 and checked('DBSIZE') or 0
if cheap >= 0 and size > cheap then
  local estimate = 0
  local page = {}
  if tonumber(ARGV[5]) > 0 then
    page = checked('SCAN', '0', 'COUNT', ARGV[5])[2]
  end
  if #page > 0 then
    local found = add_task_keys(page, wanted, lengths, {}, 0)
    estimate = math.floor(size * found / #page)
  end
  if estimate > tonumber(ARGV[2]) or size > 2 * estimate then
    return {now, -2, size}
  end
end
local keys = task_keys(ARGV[1], ARGV[3], wanted, lengths)
if #keys > tonumber(ARGV[2]) then
  return {now, -1, #keys}
end
read_all(keys)
return out
"""
)

#: Replace a task's keys atomically.
#: KEYS: first the keys to delete (``ndelete`` of them), then the keys to write (each once,
#: as a checkpoint names them: strings without a TTL are written last, by MSET).
#: ARGV: ``ndelete, specs, [how, ...]``. ``specs`` is one flat
#: msgpack array (bytes as raw strings), for each key to write in KEYS order ``type, pttl,
#: value`` (type string or dump) or ``type, pttl, n, item1 .. itemN`` (list, set: the
#: elements; hash: field, value, ...; zset: score, member, ...); pttl is the TTL to set in
#: ms (<= 0: none). One blob instead of an argument per item keeps the client from
#: building and the server from parsing a huge command; flat, it makes no table per key
#: on either side. ``how`` makes sure no
#: key created since the caller listed the task's keys survives:
#:
#: * ``scan, pattern, scan_count, max_extra, prefix1, prefix2, ...`` (one server): every
#:   key of the task an in-script SCAN finds is deleted first too; if more than
#:   ``max_extra`` of them are not keys to write, nothing is written and ``{-2, their
#:   number}`` is returned (the task is too large for one script);
#: * ``slot, prefix1, prefix2, ...`` (Redis Cluster, all KEYS in one slot): if the slot
#:   holds keys of the task that are not in KEYS, nothing is written and
#:   ``{-1, {key, ...}}`` is returned, for the caller to try again with them.
#:
#: Items go 1000 at a time (an even number, so pairs stay whole) to stay below Lua's
#: unpack limit.
#: Returns ``{keys written, keys deleted that were not rewritten}``.
RESTORE = (
    _TASK_KEYS
    + _SLOT_KEYS
    + _UNDECLARED
    + r"""
local ndel = tonumber(ARGV[1])
local specs = cmsgpack.unpack(ARGV[2])
local writing = {}
for i = ndel + 1, #KEYS do
  writing[KEYS[i]] = true
end
if ARGV[3] == 'slot' then
  local missed = undeclared(4)
  if #missed > 0 then
    return {-1, missed}
  end
end
local found = {}
if ARGV[3] == 'scan' then
  found = task_keys(ARGV[4], ARGV[5], prefixes(7))
  local extra = 0
  for _, key in ipairs(found) do
    if not writing[key] then
      extra = extra + 1
    end
  end
  if extra > tonumber(ARGV[6]) then
    -- SCAN may name a key twice (while Redis rehashes): count each once to be sure.
    local seen = {}
    extra = 0
    for _, key in ipairs(found) do
      if not writing[key] and not seen[key] then
        seen[key] = true
        extra = extra + 1
      end
    end
    if extra > tonumber(ARGV[6]) then
      return {-2, extra}
    end
  end
end
local removed = 0
local function drop(key)
  if not writing[key] then
    removed = removed + redis.call('DEL', key)
  end
end
for i = 1, ndel do
  drop(KEYS[i])
end
for _, key in ipairs(found) do
  drop(key)
end
local commands = {list = 'RPUSH', set = 'SADD', hash = 'HSET', zset = 'ZADD'}
-- Strings without a TTL (most keys) go in one MSET per 1,000. A Redis user denied MSET
-- (an ACL) gets SET key by key: the first MSET tells (refused before it writes), and
-- is not sent again.
local plain, nplain, has_mset = {}, 0, nil
local function flush_plain()
  if nplain == 0 then
    return
  end
  if has_mset ~= false then
    local done = redis.pcall('MSET', unpack(plain, 1, nplain))
    has_mset = type(done) ~= 'table' or done['err'] == nil
  end
  if not has_mset then
    for j = 1, nplain, 2 do
      redis.call('SET', plain[j], plain[j + 1])
    end
  end
  nplain = 0
end
local s = 1
for i = ndel + 1, #KEYS do
  local key = KEYS[i]
  local ty, pttl = specs[s], specs[s + 1]
  -- SET, MSET and RESTORE ... REPLACE replace the key whole, its TTL included.
  if ty == 'string' then
    if pttl > 0 then
      redis.call('SET', key, specs[s + 2], 'PX', pttl)
    else
      plain[nplain + 1] = key
      plain[nplain + 2] = specs[s + 2]
      nplain = nplain + 2
      if nplain == 2000 then
        flush_plain()
      end
    end
    s = s + 3
  elseif ty == 'dump' then
    redis.call('RESTORE', key, math.max(pttl, 0), specs[s + 2], 'REPLACE')
    s = s + 3
  else
    redis.call('DEL', key)
    local cmd = commands[ty]
    local j = s + 3
    local last = s + 2 + specs[s + 2]
    while j <= last do
      local k = math.min(j + 999, last)
      redis.call(cmd, key, unpack(specs, j, k))
      j = k + 1
    end
    if pttl > 0 then
      redis.call('PEXPIRE', key, pttl)
    end
    s = last + 1
  end
end
flush_plain()
return {#KEYS - ndel, removed}
"""
)

#: Delete every key of a task: the first command of the restore's MULTI/EXEC on one
#: server (see ``RedisRuntime._write_transaction``), so no key created before it
#: survives, and none is created between it and the writes, which follow it. The keys
#: to be written are not passed: each one given to a script costs Redis a Lua string
#: (10,000 keys: 3 ms or more, when Redis holds no key of the task after a crash),
#: and deleting a key that is written next is no more work than overwriting it.
#: KEYS: none.  ARGV: ``pattern, scan_count, prefix1, ...``.  Returns the keys deleted.
DROP_TASK = (
    _TASK_KEYS
    + r"""
local keys = task_keys(ARGV[1], ARGV[2], prefixes(3))
for first = 1, #keys, 1000 do
  redis.call('DEL', unpack(keys, first, math.min(first + 999, #keys)))
end
return keys
"""
)

#: Delete keys atomically.  KEYS: the keys.  Returns the number deleted.
DELETE = r"""
local n = 0
for i = 1, #KEYS do
  n = n + redis.call('DEL', KEYS[i])
end
return n
"""

#: Release a lock only if ARGV[1] (the owner token) still holds KEYS[1].  Returns 1 or 0.
RELEASE_IF_OWNER = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

#: Extend a lock's TTL to ARGV[2] ms only if ARGV[1] (the owner token) holds KEYS[1].
EXTEND_IF_OWNER = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
