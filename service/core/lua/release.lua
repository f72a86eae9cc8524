#!lua flags=allow-oom
-- allow-oom: at maxmemory this frees memory (clean entries get a TTL: evictable).
-- After the batch's transaction committed (or after giving up on it): clear dirty marks
-- only where the version is unchanged, give clean entries their TTL, dead-letter poison
-- writes, and hand back whatever is still held.
-- KEYS: 1 dirty, 2 inflight, 3 leases, 4 batch age, 5 dead letters, 6 counters, 7 flush log,
--       8 pending counts, 9 the batch's key, 10 pending keys (Keys.pending_keys), then the
--       entries of the committed members
--       (the puts first), then those of the dead-lettered ones, in ARGV's order
-- ARGV: 1 batch id, 2 clean TTL ms, 3 tombstone TTL ms,
--       4 number of committed puts u, 5 number of committed deletes d,
--       6 the bytes of an entry's key before its member (an entry's key ends with its
--       member, so the worker does not send each member again),
--       then the (u + d) committed versions, then pairs (version, dead-letter JSON)
-- The worker passes what it committed; an entry is read once, for its version (the compare
-- of compare-and-delete): the same version means the same write, so whether it is a delete
-- (which TTL) is what the worker committed.
-- Times (the flush log, requeued dirty marks) come from Redis' TIME, as in claim.lua.
local dirty, inflight, leases, ages, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local batch, bk = ARGV[1], KEYS[9]
local puts = tonumber(ARGV[4])
local n = puts + tonumber(ARGV[5])
local skip = tonumber(ARGV[6]) + 1
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local clean_at = string.format('%d', now + tonumber(ARGV[2]))
local tomb_at = string.format('%d', now + tonumber(ARGV[3]))

-- Pending counts (redis_keys.Keys.pending_counts): each collection's field moves by what
-- this script adds to or removes from dirty + inflight: -1 for a key committed and clean
-- or dead-lettered, 0 for one handed back or put back because a newer write landed.
local delta = {}
local function count(m, d)
  if d ~= 0 then
    local c = string.sub(m, 1, (string.find(m, ':', 1, true) or 0) - 1)
    delta[c] = (delta[c] or 0) + d
  end
end

local function owned(m)
  return redis.call('HGET', inflight, m) == batch
end

-- include batch_members.lua
local listed, times = nil, nil
local function members()
  if not listed then
    listed, times = batch_members(9)
  end
  return listed
end
-- A member handed back is dirty again from the batch's oldest dirty time (at or before its
-- own: it is due again at once, and the oldest pending age stays true).
local since = nil
local function dirty_time(m)
  members()
  if times[m] then
    return times[m]
  end
  if not since then
    since = redis.call('ZSCORE', ages, batch) or now
  end
  return since
end

-- Who holds each committed key, in one call (the loop below does not change inflight).
local committed_members = {}
for j = 1, n do
  committed_members[j] = string.sub(KEYS[10 + j], skip)
end
local owners = {}
if n > 0 then
  owners = redis.call('HMGET', inflight, unpack(committed_members))
end

local committed = 0
local handled = {}
local released, nr = {}, 0
-- Members no longer pending nor dead-lettered: out of the pending keys (listing).
local unlisted, nu = {}, 0
for j = 1, n do
  local m, v = committed_members[j], ARGV[6 + j]
  local e = KEYS[10 + j]
  handled[m] = true
  committed = committed + 1
  local mine = owners[j] == batch
  if mine then
    nr = nr + 1
    released[nr] = m
    count(m, -1)
  end
  -- 'e': a memcached exptime (cache_ttl.lua), applied once the entry is clean.
  local got = redis.call('HMGET', e, 'v', 'e')
  local cur = got[1]
  if cur == v then
    -- Committed: the entry is clean, unless we had lost it and another batch holds it.
    -- (While we owned it, writes could not put it back in the dirty set.) A clean entry
    -- is committed at its version (committed.lua); 'p' records it only while the entry
    -- stays pending.
    if mine or redis.call('HEXISTS', inflight, m) == 0 then
      if not mine then
        count(m, -redis.call('ZREM', dirty, m))
      end
      -- PEXPIREAT: Redis rewrites a PEXPIRE into one (for AOF and replicas) per call.
      if j > puts then
        redis.call('PEXPIREAT', e, tomb_at)
      elseif got[2] and tonumber(got[2]) < tonumber(clean_at) then
        redis.call('PEXPIREAT', e, got[2])
      else
        redis.call('PEXPIREAT', e, clean_at)
      end
      nu = nu + 1
      unlisted[nu] = m
    else
      redis.call('HSET', e, 'p', v)
    end
  elseif cur then
    local p = redis.call('HGET', e, 'p')
    if not p or tonumber(p) < tonumber(v) then
      redis.call('HSET', e, 'p', v)
    end
    -- A newer write landed while we flushed: it must be flushed too.
    if mine then
      count(m, redis.call('ZADD', dirty, 'NX', dirty_time(m), m))
    end
  end
end

local dead_count = 0
local entry = 10 + n
for i = 7 + n, #ARGV - 1, 2 do
  local v, info = ARGV[i], ARGV[i + 1]
  entry = entry + 1
  local e = KEYS[entry]
  local m = string.sub(e, skip)
  handled[m] = true
  if owned(m) then
    redis.call('HDEL', inflight, m)
    count(m, -1)
    local cur = redis.call('HGET', e, 'v')
    if cur == v then
      -- Count the attempts across operator retries (a new write resets the count).
      local attempts = redis.call('HINCRBY', e, 'a', 1)
      redis.call('HSET', dead, m, string.sub(info, 1, -2) .. ',"attempts":' .. attempts .. '}')
      redis.call('HSET', e, 'x', '1')
      dead_count = dead_count + 1
    elseif cur then
      count(m, redis.call('ZADD', dirty, 'NX', dirty_time(m), m))
    else
      nu = nu + 1
      unlisted[nu] = m
    end
  end
end

-- Hand back anything still held (shutdown, or a batch given up on).
local rest = members()
for j = 1, #rest do
  local m = rest[j]
  if not handled[m] and redis.call('HGET', inflight, m) == batch then
    redis.call('HDEL', inflight, m)
    count(m, redis.call('ZADD', dirty, 'NX', dirty_time(m), m) - 1)
  end
end
if nr > 0 then
  redis.call('HDEL', inflight, unpack(released))
end
if nu > 0 then
  redis.call('ZREM', KEYS[10], unpack(unlisted))
end
for c, d in pairs(delta) do
  if d ~= 0 and redis.call('HINCRBY', KEYS[8], c, d) <= 0 then
    redis.call('HDEL', KEYS[8], c)
  end
end
redis.call('DEL', bk)
redis.call('ZREM', leases, batch)
redis.call('ZREM', ages, batch)
if committed > 0 then
  redis.call('HINCRBY', KEYS[6], 'flushed', committed)
  redis.call('HINCRBY', KEYS[6], 'batches', 1)
  redis.call('ZADD', KEYS[7], now, now .. ':' .. committed .. ':' .. batch)
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now - 600000)
end
if dead_count > 0 then
  redis.call('HINCRBY', KEYS[6], 'dead_lettered', dead_count)
end
return {committed, dead_count}
