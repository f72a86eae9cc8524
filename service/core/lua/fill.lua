-- Cache-aside fill: install what Postgres returned only if nothing newer is known.
-- KEYS: 1 entry, 2 floor
-- ARGV: 1 version, 2 document ("" with ARGV[3] = 1 for absent), 3 absent (0/1), 4 TTL ms
-- Returns 1 if installed, 0 if a newer entry, tombstone or floor won.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local floor = redis.call('GET', KEYS[2])
if floor and tonumber(floor) > tonumber(ARGV[1]) then
  return 0
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 't', '1', 'p', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2], 'p', ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
