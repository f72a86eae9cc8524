#!lua flags=allow-oom
-- allow-oom: draining must work at maxmemory (see release.lua; claim adds little).
-- Claim a batch of dirty keys for flushing, under a lease; first hand back batches whose
-- lease ran out (their worker died), so another worker takes them over.
-- KEYS: 1 dirty, 2 inflight, 3 leases, 4 batch age, 5 pending counts
-- ARGV: 1 write delay ms, 2 max keys, 3 max bytes, 4 batch id, 5 lease ms, 6 prefix,
--       7.. explicit members (claim only these, if dirty)
-- Returns a flat list: member, version, document, tombstone flag, ...
-- One clock: every time here (lease expiry, readiness) is Redis' TIME, the clock write.lua
-- stamps dirty marks with; callers pass only durations, so a worker's skewed clock can
-- neither expire a live lease nor hold back a due key.
local dirty, inflight, leases = KEYS[1], KEYS[2], KEYS[3]
local prefix = ARGV[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Pending counts (redis_keys.Keys.pending_counts): each collection's field moves by what
-- this script adds to or removes from dirty + inflight (moving a key from one to the
-- other changes nothing; a dirty mark whose entry is gone is dropped, -1).
local delta = {}
local function count(m, d)
  if d ~= 0 then
    local c = string.sub(m, 1, (string.find(m, ':', 1, true) or 0) - 1)
    delta[c] = (delta[c] or 0) + d
  end
end
local function apply_counts()
  for c, d in pairs(delta) do
    if d ~= 0 and redis.call('HINCRBY', KEYS[5], c, d) <= 0 then
      redis.call('HDEL', KEYS[5], c)
    end
  end
end

local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 16)
for _, b in ipairs(expired) do
  local bk = prefix .. 'b:' .. b
  local items = redis.call('HGETALL', bk)
  for i = 1, #items, 2 do
    if redis.call('HGET', inflight, items[i]) == b then
      redis.call('HDEL', inflight, items[i])
      count(items[i], redis.call('ZADD', dirty, 'NX', items[i + 1], items[i]) - 1)
    end
  end
  redis.call('DEL', bk)
  redis.call('ZREM', leases, b)
  redis.call('ZREM', KEYS[4], b)
end

local candidates = {}
if #ARGV > 6 then
  local seen = {}
  for i = 7, #ARGV do
    local s = not seen[ARGV[i]] and redis.call('ZSCORE', dirty, ARGV[i])
    seen[ARGV[i]] = true
    if s then
      table.insert(candidates, ARGV[i])
      table.insert(candidates, s)
    end
  end
else
  candidates = redis.call('ZRANGEBYSCORE', dirty, '-inf', now - tonumber(ARGV[1]), 'WITHSCORES',
    'LIMIT', 0, tonumber(ARGV[2]))
end
if #candidates == 0 then
  apply_counts()
  return {}
end

local batch = ARGV[4]
local bk = prefix .. 'b:' .. batch
local max_bytes = tonumber(ARGV[3])
local bytes = 0
local out = {}
local taken, owned, ages = {}, {}, {}
local oldest = nil
for i = 1, #candidates, 2 do
  local m, score = candidates[i], candidates[i + 1]
  local ent = redis.call('HMGET', prefix .. 'e:' .. m, 'v', 'd', 't')
  local size = ent[2] and #ent[2] or 0
  if #out > 0 and bytes + size > max_bytes then
    break
  end
  table.insert(taken, m)
  if ent[1] then
    bytes = bytes + size
    table.insert(owned, m)
    table.insert(owned, batch)
    table.insert(ages, m)
    table.insert(ages, score)
    if not oldest or tonumber(score) < oldest then
      oldest = tonumber(score)
    end
    table.insert(out, m)
    table.insert(out, ent[1])
    table.insert(out, ent[2] or '')
    table.insert(out, ent[3] or '0')
  else
    count(m, -1)
  end
end
-- One call each for the whole batch (at most BATCH_SIZE keys: well within unpack's limit).
if #taken > 0 then
  redis.call('ZREM', dirty, unpack(taken))
end
if #out > 0 then
  redis.call('HSET', inflight, unpack(owned))
  redis.call('HSET', bk, unpack(ages))
  redis.call('ZADD', leases, now + tonumber(ARGV[5]), batch)
  redis.call('ZADD', KEYS[4], oldest, batch)
end
apply_counts()
return out
