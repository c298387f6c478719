-- wrk script for benchmarks/http_load.py (see there). Environment:
--   LOAD_REQUESTS  file of requests, one per line: PATH <TAB> JSON body
--   LOAD_MAX       stop each thread after this many responses (0: only the duration bounds)
--   LOAD_OUT       where done() writes the summary as JSON
-- Each thread starts at a different offset and cycles through the file.

local requests = {}
local index = 0
local received = 0
local max_requests = tonumber(os.getenv("LOAD_MAX") or "0")
local thread_number = 0
local threads = {}

function setup(thread)
  thread:set("thread_number", thread_number)
  thread_number = thread_number + 1
  table.insert(threads, thread)
end

function init(args)
  local headers = {["Content-Type"] = "application/json"}
  for line in io.lines(os.getenv("LOAD_REQUESTS")) do
    local tab = string.find(line, "\t", 1, true)
    local path = string.sub(line, 1, tab - 1)
    local body = string.sub(line, tab + 1)
    table.insert(requests, wrk.format("POST", path, headers, body))
  end
  index = (thread_number * 7919) % #requests
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function response(status, headers, body)
  received = received + 1
  if max_requests > 0 and received >= max_requests then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local out = io.open(os.getenv("LOAD_OUT"), "w")
  local e = summary.errors
  out:write(string.format(
    '{"duration_us": %d, "requests": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
  out:close()
end
