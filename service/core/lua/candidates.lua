#!lua flags=no-writes
-- The first step of a claim (Flusher.claim), read only, on Redis' clock: the batches whose
-- lease ran out and the dirty keys that are due, oldest first. takeover.lua and claim.lua
-- check each again before acting on it (this declares only what it reads: their keys
-- are declared by those scripts, from what this returns).
-- no-writes: Redis runs it at maxmemory (draining must work there; see release.lua).
-- KEYS: 1 dirty, 2 leases
-- ARGV: 1 write delay ms ("" = leases only), 2 max dirty keys, 3 max leases
-- Returns {expired batch ids, due members}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local due = {}
if ARGV[1] ~= '' then
  due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]), 'LIMIT', 0,
    tonumber(ARGV[2]))
end
return {expired, due}
