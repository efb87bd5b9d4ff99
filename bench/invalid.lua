-- wrk script: GET /verify with a fresh random, well-formed but unknown 64-hex token on every
-- request (invalid-token flood: each one is a cache miss for every tier and a Postgres lookup
-- unless the server short-circuits it). Expected answer: 401. See common.lua for env vars.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local C = dofile(dir .. "common.lua")

local header = os.getenv("BENCH_HEADER") or "Authorization"
issued, wraps, ntokens = 0, 0, 0
local hex = {}
for i = 0, 15 do hex[i] = string.format("%x", i) end

setup = C.setup

function init(args)
  math.randomseed(os.time() + (tid or 0) * 104729)
  C.init_pacing(tonumber(os.getenv("BENCH_THREADS") or "2") or 2)
end

function request()
  local parts = {}
  for i = 1, 8 do parts[i] = string.format("%08x", math.random(0, 0x7fffffff) * 2 + math.random(0, 1)) end
  issued = issued + 1
  return wrk.format("GET", C.path, { [header] = "Token " .. table.concat(parts) })
end

if C.rate > 0 then delay = C.delay end
done = C.done
