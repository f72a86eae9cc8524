-- wrk load script of `python -m bench.edge`:
--   wrk -tT -cN -dS --latency -s edge.lua URL -- COLLECTION KEYS WRITE_PERCENT SEED
-- Each request picks k<i>, i uniform in [0, KEYS): a PUT of a ~200-byte document with
-- probability WRITE_PERCENT %, else a GET. done() prints "WRK_JSON {...}" (latency in µs).

local collection, nkeys, write_pct = "shared", 10000, 5
local paths = {}
local threads = {}
local body = '{"name":"edge-bench","tags":["alpha","beta","gamma"],"address":{"city":"Springfield"},'
  .. '"notes":"' .. string.rep("x", 100) .. '"}'
local json_headers = { ["Content-Type"] = "application/json" }

function setup(thread)
  thread:set("id", #threads)
  threads[#threads + 1] = thread
end

function init(args)
  collection = args[1] or collection
  nkeys = tonumber(args[2] or nkeys)
  write_pct = tonumber(args[3] or write_pct)
  math.randomseed(tonumber(args[4] or 1) + id)
  for i = 0, nkeys - 1 do
    paths[i] = string.format("/v1/%s/k%05d", collection, i)
  end
end

function request()
  local path = paths[math.random(0, nkeys - 1)]
  if math.random() * 100 < write_pct then
    return wrk.format("PUT", path, json_headers, body)
  end
  return wrk.format("GET", path)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"socket_errors":%d,"non_2xx":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
