#!lua flags=no-writes
-- Write-Mode: through asks: is this write committed to Postgres (or superseded by a newer
-- committed one), dead-lettered, or neither yet? An entry neither dirty, in flight nor
-- dead-lettered is committed at its version (release.lua clears those marks only after
-- the commit); 'p' is a version known committed while a newer one is pending.
-- no-writes: it answers at maxmemory too.
-- KEYS: 1 entry, 2 dirty, 3 inflight, 4 dead letters
-- ARGV: 1 member, 2 version
-- Returns 1 committed, -1 dead-lettered, 0 neither yet
local m, version = ARGV[1], tonumber(ARGV[2])
local cur = redis.call('HMGET', KEYS[1], 'v', 'p')
if cur[2] and tonumber(cur[2]) >= version then
  return 1
end
if redis.call('HEXISTS', KEYS[4], m) == 1 then
  return -1
end
if cur[1] and tonumber(cur[1]) >= version and not redis.call('ZSCORE', KEYS[2], m)
    and redis.call('HEXISTS', KEYS[3], m) == 0 then
  return 1
end
return 0
