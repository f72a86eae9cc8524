-- Operator decisions on dead letters, atomically per key.
-- KEYS: 1 dead letters, 2 dirty, 3 inflight, 4 pending counts, 5 pending keys,
--       6.. the members' entries, in ARGV's order (ARGV[i]'s entry is KEYS[i + 4])
-- ARGV: 1 action (retry|drop), 2.. members
-- retry: the write goes back to the dirty set (flushed again with its current version).
-- drop: the write is discarded and the cached entry evicted, so reads show Postgres.
-- Returns the members acted upon.
-- A retried write is dirty from now on Redis' clock (the one claim.lua compares with).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local done = {}
for i = 2, #ARGV do
  local m = ARGV[i]
  if redis.call('HDEL', KEYS[1], m) == 1 then
    local e = KEYS[i + 4]
    if ARGV[1] == 'retry' then
      redis.call('HDEL', e, 'x')
      if redis.call('EXISTS', e) == 0 then
        redis.call('ZREM', KEYS[5], m) -- nothing left to list but what Postgres holds
      elseif redis.call('HEXISTS', KEYS[3], m) == 0 then
        -- Pending counts (redis_keys.Keys.pending_counts): pending again, +1.
        if redis.call('ZADD', KEYS[2], 'NX', now, m) == 1 then
          redis.call('HINCRBY', KEYS[4], string.sub(m, 1, (string.find(m, ':', 1, true) or 0) - 1), 1)
        end
      end
    else
      redis.call('DEL', e)
      -- Reads show Postgres again: so does listing (Keys.pending_keys).
      redis.call('ZREM', KEYS[5], m)
    end
    table.insert(done, m)
  end
end
return done
