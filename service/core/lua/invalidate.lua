-- Drop clean cached copies so the next read loads from Postgres; never a pending write.
-- KEYS: 1 dirty, 2 inflight, 3 dead letters
-- ARGV: 1 prefix, 2 floor TTL ms, 3.. members
-- Returns {invalidated, skipped_pending}
-- Touches neither dirty nor inflight, so the pending counts (Keys.pending_counts) hold.
local prefix = ARGV[1]
local dropped, skipped = 0, 0
for i = 3, #ARGV do
  local m = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], m) or redis.call('HEXISTS', KEYS[2], m) == 1
      or redis.call('HEXISTS', KEYS[3], m) == 1 then
    skipped = skipped + 1
  else
    local e = prefix .. 'e:' .. m
    local v = redis.call('HGET', e, 'v')
    if v then
      -- A fill that read Postgres before this version committed must not install it.
      redis.call('SET', prefix .. 'f:' .. m, v, 'PX', ARGV[2])
      redis.call('DEL', e)
      dropped = dropped + 1
    end
  end
end
return {dropped, skipped}
