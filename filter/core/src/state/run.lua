-- the batch: each operation in turn; the first that answers ends it
local i = 5
while i <= #ARGV do
  local a, nxt = args(i)
  local handler = OPS[ARGV[i]]
  if not a or not handler then
    return redis.error_reply('apisec: unknown state operation')
  end
  local reply = handler(a)
  if reply then
    return reply
  end
  i = nxt
end
return out
