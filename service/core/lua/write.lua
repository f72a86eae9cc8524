-- The whole write path in one round trip: preconditions, version, entry, dirty mark,
-- backpressure and "must a flush be scheduled?".
-- KEYS: 1 entry, 2 dirty, 3 inflight, 4 wake, 5 dead, 6 pending counts, 7 key filter,
--       8 the key filter's origin, 9 pending keys (redis_keys.Keys.pending_keys),
--       10 the shard's edge purge queue (given only for a public collection's record
--       when edges are purged; write_many.lua never passes it)
-- ARGV: 1 op (put|del|patch), 2 document, 3 member,
--       4 If-Match mode (0 none, 1 "*", 2 list), 5 If-Match list ",v1,v2,",
--       6 If-None-Match mode, 7 If-None-Match list,
--       8 expected version for a patch compare-and-set ("" = none),
--       9 Postgres known (0/1), 10 Postgres version floor, 11 Postgres row exists (0/1),
--       12 wake TTL ms, 13 max pending ("0": no limit, for writes forced through),
--       14 the key filter's complete bit ("" = no filter), 15 this server's run_id, as the
--       client learnt it on this connection ("": unknown), 16.. the member's filter bits
-- Returns {status, version, created, schedule}; status OK, MISS, NOTFOUND, PRECOND,
-- CONFLICT or FULL.
local e = KEYS[1]
local op = ARGV[1]
local m = ARGV[3]
local filtered = ARGV[14] ~= ''

-- 'x' (dead-lettered), 'a' (attempts) and 'e' (a memcached exptime: cache_ttl.lua, which
-- runs after the write that sets one) are read only to skip clearing them when absent.
local cur = redis.call('HMGET', e, 'v', 't', 'x', 'a', 'e')
local cached = cur[1] ~= false
local exists, curv
if cached then
  exists = cur[2] ~= '1'
  curv = cur[1]
elseif ARGV[9] == '1' then
  exists = ARGV[11] == '1'
  curv = ARGV[10]
else
  -- Not cached, Postgres not asked: a complete key filter (service/core/key_filter.py)
  -- with one of the member's bits unset says Postgres has neither row nor tombstone;
  -- trusted only on the server that completed it (a failover or a restart may have lost
  -- bits of keys Postgres now holds).
  if not filtered or ARGV[15] == '' or redis.call('GET', KEYS[8]) ~= ARGV[15] then
    return {'MISS'}
  end
  local absent = false
  if redis.call('GETBIT', KEYS[7], ARGV[14]) == 1 then
    for i = 16, #ARGV do
      absent = absent or redis.call('GETBIT', KEYS[7], ARGV[i]) == 0
    end
  end
  if not absent then
    return {'MISS'}
  end
  exists = false
  curv = '0'
end

if (op == 'del' or op == 'patch') and not exists then
  return {'NOTFOUND', curv}
end

local needle = ',' .. curv .. ','
if ARGV[4] == '1' and not exists then
  return {'PRECOND', curv}
elseif ARGV[4] == '2' and (not exists or not string.find(ARGV[5], needle, 1, true)) then
  return {'PRECOND', curv}
end
if ARGV[6] == '1' and exists then
  return {'PRECOND', curv}
elseif ARGV[6] == '2' and exists and string.find(ARGV[7], needle, 1, true) then
  return {'PRECOND', curv}
end
if ARGV[8] ~= '' and ARGV[8] ~= curv then
  return {'CONFLICT', curv}
end

-- A key is either dirty or in flight, never both (claim moves it, release puts it back).
local pending = redis.call('ZSCORE', KEYS[2], m) ~= false
if not pending then
  pending = redis.call('HEXISTS', KEYS[3], m) == 1
end
if not pending then
  local max_pending = tonumber(ARGV[13])
  if max_pending > 0 and redis.call('ZCARD', KEYS[2]) + redis.call('HLEN', KEYS[3]) >= max_pending then
    return {'FULL', curv}
  end
end

-- Versions come from Redis' clock in microseconds, and always exceed the current one
-- (cached or read from Postgres), so they stay above Postgres across evictions and
-- Redis data loss. Doubles hold integers exactly up to 2^53 (year 2255 in µs).
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nv = math.max(now_us, tonumber(curv) + 1)
local nvs = string.format('%d', nv)

if op == 'del' then
  redis.call('HSET', e, 'v', nvs, 't', '1')
  redis.call('HDEL', e, 'd', 'x', 'a', 'e')
else
  redis.call('HSET', e, 'v', nvs, 'd', ARGV[2])
  if cur[2] or cur[3] or cur[4] or cur[5] then
    redis.call('HDEL', e, 't', 'x', 'a', 'e')
  end
end
if not cached then
  redis.call('HSET', e, 'p', curv)
end
-- A pending key already has no TTL (dirty entries never expire), no dead letter (a
-- dead-lettered key is neither dirty nor in flight until a write or a retry, and both
-- clear it) and its queue mark: only a clean key needs these.
if not pending then
  if cached then
    redis.call('PERSIST', e)
  end
  redis.call('HDEL', KEYS[5], m)
  -- Pending counts (redis_keys.Keys.pending_counts): the key becomes pending, +1.
  if redis.call('ZADD', KEYS[2], 'NX', math.floor(now_us / 1000), m) == 1 then
    redis.call('HINCRBY', KEYS[6], string.sub(m, 1, (string.find(m, ':', 1, true) or 0) - 1), 1)
    -- Listed from now on (GET /v1/{collection}) until release.lua finds it committed.
    redis.call('ZADD', KEYS[9], 0, m)
  end
end
-- Every write marks its key in the filter: a key Postgres may hold from now on. Only a
-- worker creates the filter (key_filter_build.py): its bitmap is sized for the capacity.
if filtered and redis.call('EXISTS', KEYS[7]) == 1 then
  local set = {}
  for i = 16, #ARGV do
    set[#set + 1] = 'SET'
    set[#set + 1] = 'u1'
    set[#set + 1] = ARGV[i]
    set[#set + 1] = 1
  end
  redis.call('BITFIELD', KEYS[7], unpack(set))
end
-- The edge purge is queued in the write's own script: an acknowledged write always has
-- its purge queued, even if the API dies right after answering (service/core/purge.py).
if KEYS[10] then
  redis.call('ZADD', KEYS[10], math.floor(now_us / 1000), 'r:' .. m)
end
local schedule = '0'
if redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[12]) then
  schedule = '1'
end
local created = '0'
if not exists then
  created = '1'
end
return {'OK', nvs, created, schedule}
