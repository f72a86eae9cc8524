-- Completes a shard's key filter (service/core/key_filter.py): ORs in the bitmap a build
-- made of every key Postgres and the cache entries held, then sets the complete bit.
-- Writes set bits meanwhile; OR keeps them.
-- KEYS: 1 key filter, 2 scratch key (same slot), 3 the filter's origin
-- ARGV: 1 the build's bitmap, 2 the complete bit's index, 3 this server's run_id (writes
--       trust the filter only on the server it was completed on)
redis.call('SET', KEYS[2], ARGV[1])
redis.call('BITOP', 'OR', KEYS[1], KEYS[1], KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('SETBIT', KEYS[1], ARGV[2], 1)
redis.call('SET', KEYS[3], ARGV[3])
return 1
