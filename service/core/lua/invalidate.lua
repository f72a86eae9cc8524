-- Drop clean cached copies so the next read loads from Postgres; never a pending write.
-- KEYS: 1 dirty, 2 inflight, 3 dead letters, then each member's entry and fill floor, in
--       ARGV's order (ARGV[i]'s are KEYS[2 * i] and KEYS[2 * i + 1])
-- ARGV: 1 floor TTL ms, 2.. members
-- Returns {invalidated, skipped_pending}
-- Touches neither dirty nor inflight, so the pending counts (Keys.pending_counts) hold.
local dropped, skipped = 0, 0
for i = 2, #ARGV do
  local m = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], m) or redis.call('HEXISTS', KEYS[2], m) == 1
      or redis.call('HEXISTS', KEYS[3], m) == 1 then
    skipped = skipped + 1
  else
    local e = KEYS[2 * i]
    local v = redis.call('HGET', e, 'v')
    if v then
      -- A fill that read Postgres before this version committed must not install it.
      redis.call('SET', KEYS[2 * i + 1], v, 'PX', ARGV[1])
      redis.call('DEL', e)
      dropped = dropped + 1
    end
  end
end
return {dropped, skipped}
