-- Queue edge purges on one shard, due now (Redis' clock, as write.lua's own purges).
-- KEYS: 1 the purge queue
-- ARGV: the members (r:<collection>:<key> or c:<collection>)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #ARGV do
  redis.call('ZADD', KEYS[1], now, ARGV[i])
end
return #ARGV
