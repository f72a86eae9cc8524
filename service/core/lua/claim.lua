#!lua flags=allow-oom
-- allow-oom: draining must work at maxmemory (see release.lua; claim adds little).
-- Claim a batch of dirty keys for flushing, under a lease. The caller (Flusher.claim) read
-- the candidates without a script; each is checked again here, atomically (still dirty?
-- due?), and taken only if it is. Every key touched is declared: the candidates' entries
-- and the new batch's hash come in KEYS. (Batches whose lease ran out are handed back
-- first, by takeover.lua.)
-- KEYS: 1 dirty, 2 inflight, 3 leases, 4 batch age, 5 pending counts, 6 the batch's hash,
--       7.. the candidates' entries, in ARGV's order (ARGV[i]'s entry is KEYS[i + 2])
-- ARGV: 1 write delay ms ("" = claim the candidates if dirty, due or not),
--       2 max bytes, 3 batch id, 4 lease ms, 5.. candidate members
-- Returns a flat list: member, version, document, tombstone flag, ...
-- One clock: every time here (lease expiry, readiness) is Redis' TIME, the clock write.lua
-- stamps dirty marks with; callers pass only durations, so a worker's skewed clock can
-- neither expire a live lease nor hold back a due key.
local dirty, inflight, leases, ages_key, bk = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = nil
if ARGV[1] ~= '' then
  due = now - tonumber(ARGV[1])
end

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

local batch = ARGV[3]
local max_bytes = tonumber(ARGV[2])
local bytes = 0
local out = {}
local taken, owned, ages = {}, {}, {}
local oldest = nil
local seen = {}
for i = 5, #ARGV do
  local m = ARGV[i]
  local score = not seen[m] and redis.call('ZSCORE', dirty, m)
  seen[m] = true
  if score and (not due or tonumber(score) <= due) then
    local ent = redis.call('HMGET', KEYS[i + 2], 'v', 'd', 't')
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
end
-- One call each for the whole batch (at most BATCH_SIZE keys: well within unpack's limit).
if #taken > 0 then
  redis.call('ZREM', dirty, unpack(taken))
end
if #out > 0 then
  redis.call('HSET', inflight, unpack(owned))
  redis.call('HSET', bk, unpack(ages))
  redis.call('ZADD', leases, now + tonumber(ARGV[4]), batch)
  redis.call('ZADD', ages_key, oldest, batch)
end
for c, d in pairs(delta) do
  if d ~= 0 and redis.call('HINCRBY', KEYS[5], c, d) <= 0 then
    redis.call('HDEL', KEYS[5], c)
  end
end
return out
