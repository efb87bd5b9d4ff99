-- wrk script: GET /verify with "Authorization: Token <t>", t taken from a token file.
-- Random token per request (BENCH_MODE=random) or each token once in order (BENCH_MODE=seq).
-- See common.lua for the environment variables. Example:
--   BENCH_TOKENS=bench/out/tokens.txt BENCH_TOKENS_LIMIT=1000 \
--     wrk -t2 -c64 -d10s --latency -s bench/verify.lua http://127.0.0.1:18480
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local C = dofile(dir .. "common.lua")

local tokens, n, seq, stride, pos
local header = os.getenv("BENCH_HEADER") or "Authorization"
issued, wraps, ntokens = 0, 0, 0

setup = C.setup

function init(args)
  tokens = C.load_tokens()
  n = #tokens
  ntokens = n
  seq = (C.mode == "seq")
  local T = tonumber(os.getenv("BENCH_THREADS") or "2") or 2
  stride = T
  pos = (tid or 0) + 1
  math.randomseed(os.time() + (tid or 0) * 7919)
  C.init_pacing(T)
end

function request()
  local t
  if seq then
    t = tokens[pos]
    pos = pos + stride
    if pos > n then pos = ((pos - 1) % stride) + 1; wraps = wraps + 1 end
  else
    t = tokens[math.random(n)]
  end
  issued = issued + 1
  return wrk.format("GET", C.path, { [header] = "Token " .. t })
end

if C.rate > 0 then delay = C.delay end
done = C.done
