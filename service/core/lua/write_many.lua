-- Several writes to distinct keys of one shard in one call (POST /v1/batch): write.lua,
-- whose text service/core/scripts.py puts in place of the line below, once per
-- operation, in the order given, each with the KEYS and ARGV a call of write.lua alone
-- would get. One call instead of one EVALSHA per operation saves Redis and the API the
-- per-command work; the operations run one after the other as a pipeline of write.lua
-- calls would, and nothing else runs between them.
-- An error reply to one operation's command ends that operation alone, where a call of
-- write.lua would have ended, and is its reply; the next operation runs all the same.
-- KEYS: 1 dirty, 2 inflight, 3 wake, 4 dead, 5 pending counts, 6 key filter, 7 its origin,
--       8 pending keys (write.lua's KEYS 2-9: one shard's), then each operation's entry
--       (write.lua's KEYS[1])
-- ARGV: 1 n, the number of each operation's own arguments; 2-5 write.lua's ARGV 12-15,
--       which every operation shares (sent once); then each operation's n own arguments:
--       write.lua's ARGV 1-11 and 16..
-- Returns one write.lua reply (or error reply) per operation, in order.
local function write(KEYS, ARGV)
--[[write.lua]]
end

local n = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS - 8 do
  local argv, base = {}, 5 + (i - 1) * n
  for j = 1, 11 do
    argv[j] = ARGV[base + j]
  end
  argv[12], argv[13], argv[14], argv[15] = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
  for j = 12, n do
    argv[j + 4] = ARGV[base + j]
  end
  local keys = {KEYS[8 + i], KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7],
    KEYS[8]}
  local ok, reply = pcall(write, keys, argv)
  if ok then
    out[i] = reply
  elseif type(reply) == 'table' and reply.err then
    out[i] = reply
  else
    out[i] = {err = tostring(reply)}
  end
end
return out
