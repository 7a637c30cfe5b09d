-- wrk script: replays the requests of a file (one per line: METHOD<TAB>PATH<TAB>BODY), each
-- thread its own slice, so no request is sent twice unless the slice runs out (counted as
-- "wrapped"). Records every status code and, with BENCH_ACKED set, the run ids the server
-- acknowledged with a 2xx (the tracker's callback answer names its run), so the benchmark can
-- check each acknowledged callback against the database. done() prints one JSON line, with
-- "furthest": the most requests a thread took from its slice (since it last wrapped), so that
-- a second load can start past what the first sent (BENCH_SKIP).
--
-- Environment: BENCH_REQUESTS (file), BENCH_THREADS (= wrk -t), BENCH_AUTH (bearer key),
-- BENCH_CLOSE=1 (a new connection per request), BENCH_ACKED (file to write acked ids to),
-- BENCH_SKIP (lines of the file left out, from its start).

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local n = tonumber(os.getenv("BENCH_THREADS") or "1")
  local skip = tonumber(os.getenv("BENCH_SKIP") or "0")
  local auth = os.getenv("BENCH_AUTH")
  headers = { ["Content-Type"] = "application/json" }
  if auth and auth ~= "" then headers["Authorization"] = "Bearer " .. auth end
  if os.getenv("BENCH_CLOSE") == "1" then headers["Connection"] = "close" end
  record = (os.getenv("BENCH_ACKED") or "") ~= ""
  reqs = {}
  local i = 0
  for line in io.lines(os.getenv("BENCH_REQUESTS")) do
    if i >= skip and (i - skip) % n == id then
      local method, path, body = line:match("^(%u+)\t([^\t]*)\t(.*)$")
      if body == "" then body = nil end
      reqs[#reqs + 1] = { method, path, body }
    end
    i = i + 1
  end
  pos, wrapped, ok, bad = 0, 0, 0, 0
  codes = {}
  acked = {}
end

function request()
  pos = pos + 1
  if pos > #reqs then
    pos = 1
    wrapped = wrapped + 1
  end
  local r = reqs[pos]
  return wrk.format(r[1], r[2], headers, r[3])
end

function response(status, hdrs, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
    if record then
      local rid = body:match('"run_id":"(run%-[%x%-]+)"')
      if rid then acked[#acked + 1] = rid end
    end
  else
    bad = bad + 1
    codes[tostring(status)] = (codes[tostring(status)] or 0) + 1
  end
end

function done(summary, latency, requests)
  local ok_sum, bad_sum, wrapped_sum, furthest = 0, 0, 0, 0
  local code_sum = {}
  local ackfile = os.getenv("BENCH_ACKED") or ""
  local f = nil
  if ackfile ~= "" then f = io.open(ackfile, "w") end
  for _, t in ipairs(threads) do
    ok_sum = ok_sum + t:get("ok")
    bad_sum = bad_sum + t:get("bad")
    wrapped_sum = wrapped_sum + t:get("wrapped")
    furthest = math.max(furthest, t:get("pos"))
    for k, v in pairs(t:get("codes")) do code_sum[k] = (code_sum[k] or 0) + v end
    if f then
      for _, rid in ipairs(t:get("acked")) do f:write(rid, "\n") end
    end
  end
  if f then f:close() end
  local codes_json = {}
  for k, v in pairs(code_sum) do codes_json[#codes_json + 1] = string.format('"%s":%d', k, v) end
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"ok":%d,"bad":%d,"wrapped":%d,"furthest":%d,' ..
    '"codes":{%s},"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, ok_sum, bad_sum, wrapped_sum, furthest,
    table.concat(codes_json, ","), e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
