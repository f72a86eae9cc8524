-- Claim the due edge purges of one shard's queue: each is hidden (its score moved to the
-- lease's end) until it is settled by purge_settle.lua, or comes back when the lease runs
-- out (its purger died).
-- KEYS: 1 the purge queue
-- ARGV: 1 lease ms, 2 at most this many
-- Returns {now ms, lease end ms, {member, score, member, score, ...}} (the scores before
-- the claim: when each purge became due).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[2]))
local lease = now + tonumber(ARGV[1])
for i = 1, #due, 2 do
  redis.call('ZADD', KEYS[1], 'XX', lease, due[i])
end
return {now, lease, due}
