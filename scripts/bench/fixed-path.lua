-- wrk: GET BENCH_PATH with a bearer token (BENCH_TOKEN, optional), from the environment.
local token = os.getenv("BENCH_TOKEN")
local path = os.getenv("BENCH_PATH")
local headers = {}
if token and token ~= "" then
  headers["Authorization"] = "Bearer " .. token
end

function request()
  return wrk.format("GET", path, headers)
end
