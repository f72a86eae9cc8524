-- Completes a shard's key filter (service/core/key_filter.py): ORs in the bitmap a build
-- made of every key Postgres and the cache entries held, then sets the complete bit.
-- Writes set bits meanwhile; OR keeps them.
-- KEYS: 1 key filter, 2 scratch key (same slot)
-- ARGV: 1 the build's bitmap, 2 the complete bit's index
redis.call('SET', KEYS[2], ARGV[1])
redis.call('BITOP', 'OR', KEYS[1], KEYS[1], KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('SETBIT', KEYS[1], ARGV[2], 1)
return 1
