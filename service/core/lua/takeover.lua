#!lua flags=allow-oom
-- allow-oom: a full Redis must still hand a dead worker's batches on (see claim.lua).
-- Take over batches whose lease ran out (their worker died): what each still holds goes
-- back to the dirty set, dirty since the batch's oldest dirty time (due at once), for the
-- next claim. The caller read the
-- expired leases without a script; each is checked again here, on Redis' clock, so a
-- lease renewed (or released) meanwhile stands.
-- KEYS: 1 dirty, 2 inflight, 3 leases, 4 batch age, 5 pending counts,
--       6.. the batches' keys (ARGV[i]'s is KEYS[5 + i])
-- ARGV: batch ids
-- Returns how many batches were taken over.
local dirty, inflight, leases = KEYS[1], KEYS[2], KEYS[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Pending counts (redis_keys.Keys.pending_counts): moving a key from inflight back to
-- dirty changes nothing; one that is somehow dirty already counts once, -1.
local delta = {}
local taken = 0
-- include batch_members.lua
for i = 1, #ARGV do
  local b, bk = ARGV[i], KEYS[5 + i]
  local expiry = redis.call('ZSCORE', leases, b)
  if expiry and tonumber(expiry) <= now then
    -- Each member is dirty again from its own time if the batch kept it, else the
    -- batch's oldest dirty time.
    local members, times = batch_members(5 + i)
    local since = redis.call('ZSCORE', KEYS[4], b) or now
    for j = 1, #members do
      local m = members[j]
      if redis.call('HGET', inflight, m) == b then
        redis.call('HDEL', inflight, m)
        if redis.call('ZADD', dirty, 'NX', times[m] or since, m) == 0 then
          local c = string.sub(m, 1, (string.find(m, ':', 1, true) or 0) - 1)
          delta[c] = (delta[c] or 0) - 1
        end
      end
    end
    redis.call('DEL', bk)
    redis.call('ZREM', leases, b)
    redis.call('ZREM', KEYS[4], b)
    taken = taken + 1
  end
end
for c, d in pairs(delta) do
  if d ~= 0 and redis.call('HINCRBY', KEYS[5], c, d) <= 0 then
    redis.call('HDEL', KEYS[5], c)
  end
end
return taken
