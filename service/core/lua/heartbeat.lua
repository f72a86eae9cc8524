#!lua flags=allow-oom
-- A worker's heartbeat and lease renewal, allowed at maxmemory: they only update members
-- in place (a worker that looked dead, or lost its leases, while draining a full Redis
-- would have its batches handed to others mid-flush). Times are Redis' TIME, as in
-- claim.lua.
-- KEYS: 1 workers, 2 leases
-- ARGV: 1 worker id ("" = leases only), 2 lease ms, 3.. batch ids this worker holds
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600000)
end
local expiry = now + tonumber(ARGV[2])
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[2], 'XX', expiry, ARGV[i])
end
return #ARGV - 2
