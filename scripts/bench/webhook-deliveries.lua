-- wrk: the signed webhook deliveries of benches/webhook_intake.rs, each sent once. Every line
-- of $DELIVERIES is "path<TAB>Stripe-Signature<TAB>body"; thread i of $THREADS sends lines
-- i, i + $THREADS, ... and stops once each of its deliveries is answered (a connection that
-- asks for more meanwhile sends its thread's last delivery again: a redelivery), leaving the
-- file $DONE<i> behind: wrk's main thread sleeps out -d whatever its threads do, so the bench
-- interrupts it (SIGINT: wrk prints its figures for the time it ran) once every thread is done.
local count = 0

function setup(thread)
  thread:set("id", count)
  count = count + 1
end

function init(args)
  local threads = tonumber(os.getenv("THREADS"))
  requests, sent, answered = {}, 0, 0
  local n = 0
  for line in io.lines(os.getenv("DELIVERIES")) do
    if n % threads == id then
      local path, signature, body = line:match("^([^\t]+)\t([^\t]+)\t(.*)$")
      requests[#requests + 1] = wrk.format("POST", path, {
        ["Content-Type"] = "application/json",
        ["Stripe-Signature"] = signature,
      }, body)
    end
    n = n + 1
  end
end

function request()
  sent = sent + 1
  return requests[math.min(sent, #requests)]
end

function response(status, headers, body)
  answered = answered + 1
  if answered == #requests then
    io.open(os.getenv("DONE") .. id, "w"):close()
    wrk.thread:stop()
  end
end
