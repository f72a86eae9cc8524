#!lua flags=allow-oom
-- allow-oom: at maxmemory this frees memory (clean entries get a TTL: evictable).
-- After the batch's transaction committed (or after giving up on it): clear dirty marks
-- only where the version is unchanged, give clean entries their TTL, dead-letter poison
-- writes, and hand back whatever is still held.
-- KEYS: 1 dirty, 2 inflight, 3 leases, 4 batch age, 5 dead letters, 6 counters, 7 flush log,
--       8 pending counts, 9 the batch's hash, then the entries of the committed members,
--       then those of the dead-lettered ones, in ARGV's order
-- ARGV: 1 batch id, 2 clean TTL ms, 3 tombstone TTL ms,
--       4 number of committed pairs n, then n x (member, version),
--       then triples (member, version, dead-letter JSON)
-- Times (the flush log, requeued dirty marks) come from Redis' TIME, as in claim.lua.
local dirty, inflight, leases, ages, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local batch, bk = ARGV[1], KEYS[9]
local n = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

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

-- Who holds each committed key, in one call (the loop below does not change inflight).
local owners = {}
if n > 0 then
  local members = {}
  for j = 1, n do
    members[j] = ARGV[3 + 2 * j]
  end
  owners = redis.call('HMGET', inflight, unpack(members))
end

local committed = 0
local handled = {}
local released = {}
local i = 5
for j = 1, n do
  local m, v = ARGV[i], ARGV[i + 1]
  local e = KEYS[9 + j]
  i = i + 2
  handled[m] = true
  committed = committed + 1
  local mine = owners[j] == batch
  if mine then
    table.insert(released, m)
    count(m, -1)
  end
  local cur = redis.call('HMGET', e, 'v', 'p', 't')
  if cur[1] == v then
    redis.call('HSET', e, 'p', v)
    -- Committed: the entry is clean, unless we had lost it and another batch holds it.
    -- (While we owned it, writes could not put it back in the dirty set.)
    if mine or redis.call('HEXISTS', inflight, m) == 0 then
      if not mine then
        count(m, -redis.call('ZREM', dirty, m))
      end
      if cur[3] == '1' then
        redis.call('PEXPIRE', e, ARGV[3])
      else
        redis.call('PEXPIRE', e, ARGV[2])
      end
    end
  elseif cur[1] then
    if not cur[2] or tonumber(cur[2]) < tonumber(v) then
      redis.call('HSET', e, 'p', v)
    end
    -- A newer write landed while we flushed: it must be flushed too.
    if mine then
      count(m, redis.call('ZADD', dirty, 'NX', redis.call('HGET', bk, m) or now, m))
    end
  end
end

local dead_count = 0
local entry = 9 + n
while i + 2 <= #ARGV do
  local m, v, info = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  entry = entry + 1
  local e = KEYS[entry]
  handled[m] = true
  local mine = owned(m)
  local score = redis.call('HGET', bk, m)
  if mine then
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
      count(m, redis.call('ZADD', dirty, 'NX', score or now, m))
    end
  end
end

-- Hand back anything still held (shutdown, or a batch given up on).
local rest = redis.call('HGETALL', bk)
for j = 1, #rest, 2 do
  if not handled[rest[j]] and redis.call('HGET', inflight, rest[j]) == batch then
    redis.call('HDEL', inflight, rest[j])
    count(rest[j], redis.call('ZADD', dirty, 'NX', rest[j + 1], rest[j]) - 1)
  end
end
if #released > 0 then
  redis.call('HDEL', inflight, unpack(released))
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
