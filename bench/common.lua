-- Shared by verify.lua and invalid.lua (wrk 4.x, LuaJIT). Configured through environment:
--   BENCH_TOKENS        file with one token per line (verify.lua)
--   BENCH_TOKENS_LIMIT  use only the first N tokens (0 / unset = all)
--   BENCH_MODE          random (default) | seq  (seq: each thread walks its own stride of the
--                       file once, in order; after the end it wraps and counts the wraps)
--   BENCH_RATE          total requests/s to pace at (0 / unset = as fast as possible).
--                       Pacing is done with wrk's delay() hook against a per-thread schedule
--                       (millisecond granularity; latency is NOT corrected for coordinated
--                       omission as wrk2 would do).
--   BENCH_PATH          request path (default /verify)
--   BENCH_HEADER        header name that carries the token (default Authorization)
--   BENCH_RESULT        if set, a JSON line with the summary is appended to this file
local M = {}

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
function M.now_us()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

M.rate = tonumber(os.getenv("BENCH_RATE") or "0") or 0
M.path = os.getenv("BENCH_PATH") or "/verify"
M.mode = os.getenv("BENCH_MODE") or "random"
M.result_file = os.getenv("BENCH_RESULT")

-- setup() runs in the main Lua state once per thread; keep the thread objects for done().
local threads = {}
local nthreads = 0
function M.setup(thread)
  thread:set("tid", nthreads)
  nthreads = nthreads + 1
  thread:set("nthreads_hint", nthreads)
  table.insert(threads, thread)
end

function M.load_tokens()
  local file = os.getenv("BENCH_TOKENS") or "bench/out/tokens.txt"
  local limit = tonumber(os.getenv("BENCH_TOKENS_LIMIT") or "0") or 0
  local list = {}
  local fh = assert(io.open(file, "r"), "cannot open " .. file)
  for line in fh:lines() do
    if #line > 0 then
      list[#list + 1] = line
      if limit > 0 and #list >= limit then break end
    end
  end
  fh:close()
  assert(#list > 0, "no tokens in " .. file)
  return list
end

-- Pacing: each thread owns rate/threads of the total and hands out send slots in order.
local interval_us, next_slot = 0, 0
function M.init_pacing(threads_total)
  if M.rate > 0 then
    interval_us = 1e6 * threads_total / M.rate
    next_slot = M.now_us()
  end
end
function M.delay()
  local now = M.now_us()
  if next_slot < now - 1e6 then next_slot = now end -- fell >1 s behind: don't burst to catch up
  next_slot = next_slot + interval_us
  local wait = (next_slot - now) / 1000
  if wait < 0 then return 0 end
  return math.floor(wait)
end

function M.done(summary, latency, requests)
  local extra = {}
  for _, t in ipairs(threads) do
    extra[#extra + 1] = string.format('{"issued":%d,"wraps":%d,"ntokens":%d}',
      tonumber(t:get("issued") or 0) or 0, tonumber(t:get("wraps") or 0) or 0,
      tonumber(t:get("ntokens") or 0) or 0)
  end
  local e = summary.errors
  local line = string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"non2xx3xx":%d,"timeouts":%d,"lat_mean_us":%.1f,"lat_max_us":%d,' ..
    '"p50_us":%d,"p75_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"rate_target":%s,' ..
    '"mode":"%s","threads":[%s]}',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), tostring(M.rate), M.mode,
    table.concat(extra, ","))
  io.write("BENCH_JSON " .. line .. "\n")
  io.write(string.format("p99.9 latency: %.3f ms\n", latency:percentile(99.9) / 1000))
  if M.result_file then
    local fh = io.open(M.result_file, "a")
    if fh then fh:write(line .. "\n"); fh:close() end
  end
end

return M
