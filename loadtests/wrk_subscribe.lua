-- Random subscribe lookups: a random live stream (s0 .. s<STREAMS-1>) from a random region.
local streams = tonumber(os.getenv("STREAMS") or "100")
local regions = {}
for region in string.gmatch(os.getenv("REGIONS") or "us-east-1", "[^,]+") do
  table.insert(regions, region)
end

function setup(thread)
  thread:set("seed", math.random(1, 1000000))
end

function init(args)
  math.randomseed(seed or os.time())
end

request = function()
  local path = string.format("/streammanager/api/2.0/event/live/s%d?action=subscribe&region=%s",
                             math.random(0, streams - 1), regions[math.random(1, #regions)])
  return wrk.format("GET", path)
end
