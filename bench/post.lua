-- wrk script: POST one notification per request, each with an Idempotency-Key of its own.
-- wrk ... -s bench/post.lua URL -- <run nonce> <api key> <template> <recipient count>
-- The same requests go to B_http's hello-world view and to Clarion's API.

-- thread_index is a global that setup() gives each thread's own Lua state.
local counter = 0
local next_thread = 0
local nonce, api_key, template, recipients

function setup(thread)
  next_thread = next_thread + 1
  thread:set("thread_index", next_thread)
end

function init(args)
  nonce = args[1] or tostring(os.time())
  api_key = args[2] or "none"
  template = args[3] or "bench_two"
  recipients = tonumber(args[4] or "1000")
  math.randomseed(os.time() + (thread_index or 0) * 7919)
end

function request()
  counter = counter + 1
  local rid = math.random(1, recipients)
  local body = string.format(
    '{"recipient":"bench-user-%d","template":"%s","data":{"order_id":"A-%d"}}',
    rid, template, counter)
  local headers = {
    ["Authorization"] = "Bearer " .. api_key,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = string.format("%s-%d-%d", nonce, thread_index, counter),
  }
  return wrk.format("POST", nil, headers, body)
end
