-- A memcached exptime (service/api/memcached/ops.py): it bounds how long the cached copy
-- stays in Redis, never whether the write is persisted. A clean entry (it has a TTL)
-- expires at the deadline; a pending one has no TTL (dirty entries never expire) and keeps
-- the deadline in 'e', which release.lua applies once the write is committed.
-- KEYS: 1 entry
-- ARGV: 1 deadline, Unix ms ("0": none), 2 the clean TTL ms (a clean entry touched with 0)
-- Returns 0 if the entry is not cached, else 1.
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then
  return 0
end
local at = tonumber(ARGV[1])
if ttl == -1 then
  if at == 0 then
    redis.call('HDEL', KEYS[1], 'e')
  else
    redis.call('HSET', KEYS[1], 'e', ARGV[1])
  end
elseif at == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('PEXPIREAT', KEYS[1], ARGV[1])
end
return 1
