-- Random subscribe lookups: a random live stream (s0 .. s<STREAMS-1>) from a random region.
-- TARGET=healthz builds the same requests for /healthz (the stream and region in a query it ignores):
-- the benchmark's ceiling, at the same cost to wrk per request.
local streams = tonumber(os.getenv("STREAMS") or "100")
local regions = {}
for region in string.gmatch(os.getenv("REGIONS") or "us-east-1", "[^,]+") do
  table.insert(regions, region)
end
local format = "/streammanager/api/2.0/event/live/s%d?action=subscribe&region=%s"
if os.getenv("TARGET") == "healthz" then
  format = "/healthz?stream=live/s%d&action=subscribe&region=%s"
end

function setup(thread)
  thread:set("seed", math.random(1, 1000000))
end

function init(args)
  math.randomseed(seed or os.time())
end

request = function()
  local path = string.format(format, math.random(0, streams - 1), regions[math.random(1, #regions)])
  return wrk.format("GET", path)
end
