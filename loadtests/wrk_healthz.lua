-- The ceiling's requests: /healthz, built by the same Lua code as wrk_subscribe.lua's lookups (a random
-- stream and region in the query, which /healthz ignores), so that both runs cost wrk the same and the
-- ratio compares the server's work alone.
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
  local path = string.format("/healthz?stream=live/s%d&action=subscribe&region=%s",
                             math.random(0, streams - 1), regions[math.random(1, #regions)])
  return wrk.format("GET", path)
end
