-- wrk script for `make bench`: POST a chat completion body as an API client would.
-- BENCH_BODY is the body. When BENCH_BODY_PREFIX/BENCH_BODY_SUFFIX are set, every
-- request gets its own prompt (prefix .. "<thread>.<n>" .. suffix), so a response
-- cache in the gateway cannot turn the run into cache hits.
-- BENCH_AUTHORIZATION is the Authorization header (unset: "Bearer sk-bench"; empty: none).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local authorization = os.getenv("BENCH_AUTHORIZATION") or "Bearer sk-bench"
if authorization ~= "" then
   wrk.headers["Authorization"] = authorization
end

local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("thread_no", threads)
end

local prefix = os.getenv("BENCH_BODY_PREFIX")
local suffix = os.getenv("BENCH_BODY_SUFFIX")

if prefix and suffix then
   local sent = 0
   -- Defined only in this mode: without it wrk sends one prebuilt request, faster.
   function request()
      sent = sent + 1
      return wrk.format(nil, nil, nil, prefix .. (thread_no or 0) .. "." .. sent .. suffix)
   end
end
