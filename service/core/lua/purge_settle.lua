-- Settle claimed edge purges of one shard's queue. A member whose score is no longer the
-- claim's lease end was queued again meanwhile (a newer write): it stays, due then.
-- KEYS: 1 the purge queue
-- ARGV: 1 the claim's lease end (ms), 2 'done' or 'retry',
--       3 ms: for done, the delay of the second purge (0: none); for retry, the backoff,
--       4.. the members
-- done: each purge is removed, and a first purge is followed by its second ('~' before the
-- member) after the delay. retry: each purge is due again after the backoff.
-- Returns how many members were settled.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local delay = tonumber(ARGV[3])
local n = 0
for i = 4, #ARGV do
  local m = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], m)
  if score and tonumber(score) == lease then
    n = n + 1
    if ARGV[2] == 'retry' then
      redis.call('ZADD', KEYS[1], 'XX', now + delay, m)
    else
      redis.call('ZREM', KEYS[1], m)
      if delay > 0 and string.sub(m, 1, 1) ~= '~' then
        redis.call('ZADD', KEYS[1], now + delay, '~' .. m)
      end
    end
  end
end
return n
