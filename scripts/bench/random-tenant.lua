-- wrk: GET <prefix><random tenant number><suffix> with a bearer token, all from the env.
local token = os.getenv("BENCH_TOKEN")
local prefix = os.getenv("BENCH_PREFIX")
local suffix = os.getenv("BENCH_SUFFIX") or ""
local tenants = tonumber(os.getenv("BENCH_TENANTS") or "10000")
local headers = { ["Authorization"] = "Bearer " .. (token or "") }

function init(args)
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
end

function request()
  return wrk.format("GET", prefix .. math.random(0, tenants - 1) .. suffix, headers)
end
