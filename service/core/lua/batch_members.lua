-- Not a script: the lines `-- include batch_members.lua` in release.lua and takeover.lua
-- stand for this (scripts.py puts it there).
-- The members the batch whose key is KEYS[i] holds, and the dirty time of each if known:
-- claim.lua lists them in one msgpack string (each member's dirty time is the batch's
-- oldest, kept in batch age); a batch claimed by an older version is a hash of member ->
-- dirty time. Read only to hand members back.
local function batch_members(i)
  local packed = redis.pcall('GET', KEYS[i])
  if type(packed) == 'table' and packed.err then
    local all = redis.call('HGETALL', KEYS[i])
    local members, times = {}, {}
    for j = 1, #all, 2 do
      members[#members + 1] = all[j]
      times[all[j]] = all[j + 1]
    end
    return members, times
  elseif packed then
    return cmsgpack.unpack(packed), {}
  end
  return {}, {}
end
