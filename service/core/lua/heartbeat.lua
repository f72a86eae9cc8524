#!lua flags=allow-oom
-- Stamp members of a ZSET with Redis' clock (plus an offset): a worker's heartbeat in the
-- workers set, or the lease renewal of the batches a worker holds in a shard's leases.
-- Allowed at maxmemory: they only update members in place (a worker that looked dead, or
-- lost its leases, while draining a full Redis would have its batches handed to others
-- mid-flush). Times are Redis' TIME, as in claim.lua.
-- KEYS: 1 the ZSET (workers, or a shard's leases)
-- ARGV: 1 "XX" (only members already there: a lease handed back stays gone) or "",
--       2 ms added to now (a lease's length; 0 for a heartbeat),
--       3 drop members older than this many ms ("" = keep all), 4.. members
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = now + tonumber(ARGV[2])
for i = 4, #ARGV do
  if ARGV[1] == 'XX' then
    redis.call('ZADD', KEYS[1], 'XX', score, ARGV[i])
  else
    redis.call('ZADD', KEYS[1], score, ARGV[i])
  end
end
if ARGV[3] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
end
return #ARGV - 3
