-- wrk script: every request is a distinct, correctly signed event read from REQUESTS_FILE
-- (one "signature<TAB>body" per line); threads take alternate lines so none repeats.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  requests = {}
  local n = 0
  local total = tonumber(os.getenv("WRK_THREADS") or "1")
  for line in io.lines(os.getenv("REQUESTS_FILE")) do
    if n % total == id then
      local sig, body = line:match("([^\t]+)\t(.*)")
      requests[#requests + 1] = wrk.format("POST", "/webhooks/genesys",
        {["Content-Type"] = "application/json", ["X-Signature"] = sig}, body)
    end
    n = n + 1
  end
  index = 0
end

-- WRK_DELAY_MS paces each connection (connections * 1000 / delay = the offered rate).
local pace = tonumber(os.getenv("WRK_DELAY_MS") or "0")

function delay()
  return pace
end

function request()
  index = index + 1
  if index > #requests then index = 1 end
  return requests[index]
end
