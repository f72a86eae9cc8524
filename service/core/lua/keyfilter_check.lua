-- Whether a key that is not cached has certainly never been written: the key filter
-- (service/core/key_filter.py) is complete, was completed on this very server, and lacks
-- one of the key's bits. The read path's check, as write.lua's for writes.
-- KEYS: 1 key filter, 2 the filter's origin
-- ARGV: 1 the complete bit's index, 2 this server's run_id as the client learnt it on
--       this connection, 3.. the key's bits
-- Returns 1 (never written) or 0 (maybe).
if ARGV[2] == '' or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return 0
end
if redis.call('GETBIT', KEYS[1], ARGV[1]) == 0 then
  return 0
end
for i = 3, #ARGV do
  if redis.call('GETBIT', KEYS[1], ARGV[i]) == 0 then
    return 1
  end
end
return 0
