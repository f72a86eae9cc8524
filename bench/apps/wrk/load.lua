-- wrk load script of `python -m bench.suite`:
--   wrk -t1 -cN -dS --latency -s load.lua URL -- MODE COLLECTION KEYS DOC_BYTES SEED [OPS [TAG]]
-- MODE put:   PUT /v1/COLLECTION/k<i> with a ~DOC_BYTES JSON document, i uniform in [0, KEYS)
-- MODE get:   GET /v1/COLLECTION/k<i>, i uniform in [0, KEYS)
-- MODE batch: POST /v1/batch with OPS puts on distinct random keys (64 bodies, cycled)
-- MODE put-random: as put, the path built per request (KEYS may be 1,000,000: most keys new)
-- MODE put-insert: PUT /v1/COLLECTION/TAG-<thread>-<n>, n counting up: each key written once
--   (TAG must be unique per run: no other run, repetition or app has written these keys)
-- done() prints one line "WRK_JSON {...}" with the counts and latency percentiles (µs);
-- for batch, also the operations whose own status (in the 200 answer) is not 200/201.

local mode, collection, nkeys, doc_bytes, ops, tag = "put", "bench", 10000, 200, 100, "i"
local paths = {}
local pad = ""
local seq = 0
local bodies = {}
local next_body = 0
local json_headers = { ["Content-Type"] = "application/json" }
local threads = {}
op_errors = 0 -- global: done() reads it from each thread with thread:get

function setup(thread)
  thread:set("id", #threads) -- the thread's own key space in put-insert
  threads[#threads + 1] = thread
end

local function count_failed_ops(status, headers, body)
  if status == 200 and body then
    for code in string.gmatch(body, '"status":(%d+)') do
      if code ~= "200" and code ~= "201" then
        op_errors = op_errors + 1
      end
    end
  end
end

local function document(i, s)
  return string.format(
    '{"id":%d,"seq":%d,"name":"user-%06d","email":"user%06d@example.com","active":%s,'
      .. '"score":%d.25,"tags":["alpha","beta","gamma"],'
      .. '"address":{"city":"Springfield","zip":"%05d"},"notes":"%s"}',
    i, s, i, i, (i % 3 ~= 0) and "true" or "false", i % 1000, i % 100000, pad)
end

function init(args)
  mode = args[1] or mode
  collection = args[2] or collection
  nkeys = tonumber(args[3] or nkeys)
  doc_bytes = tonumber(args[4] or doc_bytes)
  math.randomseed(tonumber(args[5] or 1) + id) -- with -tN, N different key sequences
  ops = tonumber(args[6] or ops)
  tag = (args[7] or tag) .. "-" .. id .. "-"
  if mode == "put" or mode == "get" then
    for i = 0, nkeys - 1 do
      paths[i] = string.format("/v1/%s/k%07d", collection, i)
    end
  end
  local base = #document(nkeys - 1, 1000000)
  pad = string.rep("x", math.max(0, doc_bytes - base))
  if mode == "batch" then
    for b = 1, 64 do
      local parts, used = {}, {}
      while #parts < ops do
        local i = math.random(0, nkeys - 1)
        if not used[i] then
          used[i] = true
          parts[#parts + 1] = string.format(
            '{"op":"put","collection":"%s","key":"k%07d","document":%s}',
            collection, i, document(i, b))
        end
      end
      bodies[b] = '{"operations":[' .. table.concat(parts, ",") .. "]}"
    end
    -- Only here: a response() callback makes wrk hand every answer to Lua.
    response = count_failed_ops
  end
end

function request()
  if mode == "put" then
    local i = math.random(0, nkeys - 1)
    seq = seq + 1
    return wrk.format("PUT", paths[i], json_headers, document(i, seq))
  elseif mode == "get" then
    return wrk.format("GET", paths[math.random(0, nkeys - 1)])
  elseif mode == "put-random" then
    local i = math.random(0, nkeys - 1)
    seq = seq + 1
    local path = string.format("/v1/%s/k%07d", collection, i)
    return wrk.format("PUT", path, json_headers, document(i, seq))
  elseif mode == "put-insert" then
    seq = seq + 1
    local path = string.format("/v1/%s/%s%d", collection, tag, seq)
    return wrk.format("PUT", path, json_headers, document(seq, seq))
  else
    next_body = next_body % #bodies + 1
    return wrk.format("POST", "/v1/batch", json_headers, bodies[next_body])
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local failed = 0
  for _, t in ipairs(threads) do
    failed = failed + (tonumber(t:get("op_errors")) or 0)
  end
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"op_errors":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes, failed,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
