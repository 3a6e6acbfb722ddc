-- apisec: one request's state operations, atomically
-- ARGV: prefix now skew lifetime, then operations, each its code and its words in the order
-- of its layout (LAYOUT, written above this from the Rust side's one list per operation).
local p = ARGV[1]
local now = tonumber(ARGV[2])
local skew = tonumber(ARGV[3])
local life = tonumber(ARGV[4])
local hk = p .. 'horizon'
local h = tonumber(redis.call('GET', hk))
if not h then
  h = now - 1
  redis.call('SET', hk, h)
end
-- what the batch answers after 'ok' (bans started, anomalies, sessions, evictions)
local out = {'ok'}
-- the handlers, by operation code: each takes its words by name and returns nil to go on,
-- or a reply that ends the batch (a refusal, or the gauges)
local OPS = {}
-- the words of the operation at ARGV[i] by name, and where the next one starts
local function args(i)
  local l = LAYOUT[ARGV[i]]
  if not l then
    return nil
  end
  local a = {_i = i}
  for k = 1, #l do
    a[l[k]] = ARGV[i + k]
  end
  return a, i + #l + 1
end
