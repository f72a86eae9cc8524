#!lua flags=allow-oom
-- allow-oom: draining must work at maxmemory (see release.lua; claim adds little).
-- Claim a batch of dirty keys for flushing, under a lease. The caller (Flusher.claim) read
-- the candidates without a script; each is checked again here, atomically (still dirty?
-- due?), and taken only if it is. Every key touched is declared: the candidates' entries
-- and the new batch's key come in KEYS. (Batches whose lease ran out are handed back
-- first, by takeover.lua.)
-- KEYS: 1 dirty, 2 inflight, 3 leases, 4 batch age, 5 pending counts, 6 the batch's key,
--       7.. the candidates' entries
-- ARGV: 1 write delay ms ("" = claim the candidates if dirty, due or not),
--       2 max bytes, 3 batch id, 4 lease ms, 5 the bytes of an entry's key before its
--       member (an entry's key ends with its member: the candidates are not sent twice)
-- Returns a flat list: member, version, document (nil for a delete), ...
-- One clock: every time here (lease expiry, readiness) is Redis' TIME, the clock write.lua
-- stamps dirty marks with; callers pass only durations, so a worker's skewed clock can
-- neither expire a live lease nor hold back a due key.
local dirty, inflight, leases, ages_key, bk = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS - 6
local skip = tonumber(ARGV[5]) + 1
local members = {}
for j = 1, n do
  members[j] = string.sub(KEYS[j + 6], skip)
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

-- Which candidates are still dirty (and due), in one call. Due: the oldest due members,
-- without their scores (a score is a double Redis formats and Lua parses again, which cost
-- more than the rest of a key's claim); a candidate ranked past twice the candidates (older
-- ones came back meanwhile) stays for the next claim. Explicit: whether each is dirty.
local ready = {}
local order, scores = nil, {}
if ARGV[1] ~= '' then
  order = redis.call('ZRANGEBYSCORE', dirty, '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0, 2 * n)
  for j = 1, #order do
    ready[order[j]] = true
  end
else
  local found = redis.call('ZMSCORE', dirty, unpack(members))
  for j = 1, n do
    if found[j] then
      ready[members[j]] = true
      scores[members[j]] = tonumber(found[j])
    end
  end
end

local batch = ARGV[3]
local max_bytes = tonumber(ARGV[2])
local bytes = 0
local out, o = {}, 0
local taken, owned, listed = {}, {}, {}
local nt, no = 0, 0
for j = 1, n do
  local m = members[j]
  if ready[m] then
    ready[m] = nil -- a member listed twice is taken once
    local ent = redis.call('HMGET', KEYS[j + 6], 'v', 'd', 't')
    local size = ent[2] and #ent[2] or 0
    if o > 0 and bytes + size > max_bytes then
      break
    end
    nt = nt + 1
    taken[nt] = m
    if ent[1] then
      bytes = bytes + size
      owned[no + 1] = m
      owned[no + 2] = batch
      no = no + 2
      listed[no / 2] = m
      -- A delete's document is nil (false here).
      out[o + 1] = m
      out[o + 2] = ent[1]
      out[o + 3] = ent[3] ~= '1' and ent[2] or false
      o = o + 3
    else
      count(m, -1)
    end
  end
end
if no > 0 then
  -- The batch's oldest dirty time (batch age, and the time anything it hands back is
  -- dirty again from): its first member in dirty's order, one score read.
  local oldest = nil
  if order then
    local mine = {}
    for j = 1, #listed do
      mine[listed[j]] = true
    end
    for j = 1, #order do
      if mine[order[j]] then
        oldest = redis.call('ZSCORE', dirty, order[j])
        break
      end
    end
  else
    for j = 1, #listed do
      if not oldest or scores[listed[j]] < oldest then
        oldest = scores[listed[j]]
      end
    end
  end
  -- One call each for the whole batch (at most BATCH_SIZE keys: within unpack's limit).
  redis.call('ZREM', dirty, unpack(taken))
  redis.call('HSET', inflight, unpack(owned))
  -- The batch's members, as one msgpack string (a hash of BATCH_SIZE fields cost Redis
  -- ~2.5 µs of CPU per key to build and free; this ~0.2), read back only by takeover.lua
  -- and release.lua when they hand members back.
  redis.call('SET', bk, cmsgpack.pack(listed))
  redis.call('ZADD', leases, now + tonumber(ARGV[4]), batch)
  redis.call('ZADD', ages_key, oldest, batch)
elseif nt > 0 then
  redis.call('ZREM', dirty, unpack(taken))
end
for c, d in pairs(delta) do
  if d ~= 0 and redis.call('HINCRBY', KEYS[5], c, d) <= 0 then
    redis.call('HDEL', KEYS[5], c)
  end
end
return out
