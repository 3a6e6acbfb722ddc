-- rate limits (RL-1, RL-2, OPS-4): `rl:<key>:<pos>:<bucket>` counts a counter's calls in one
-- fixed window (or quota period) of its window at position `pos`, living two windows long.
-- Every window is checked first (`RC`); `RI` then counts them all, so a refused call counts
-- toward none.
local rate_counted = {}
OPS.RC = function(a)
  local k = p .. 'rl:' .. a.key .. ':' .. a.pos .. ':'
  local cur = tonumber(redis.call('GET', k .. a.bucket)) or 0
  local prev = 0
  local holds = cur
  local ms = tonumber(a.ms)
  if ms > 0 then
    prev = tonumber(redis.call('GET', k .. a.before)) or 0
    holds = cur + math.ceil(prev * (ms - tonumber(a.at)) / ms)
  end
  if holds >= tonumber(a.limit) then
    if a.refuse == '1' then
      return {'rate_limited', a.rule, a.pos, tostring(cur), tostring(prev)}
    end
    out[#out + 1] = 'rate_alert'
    out[#out + 1] = a.rule
    out[#out + 1] = a.pos
  end
  rate_counted[#rate_counted + 1] = {k .. a.bucket, a.ttl}
end
OPS.RI = function(a)
  for _, c in ipairs(rate_counted) do
    if redis.call('INCR', c[1]) == 1 then
      redis.call('EXPIRE', c[1], c[2])
    end
  end
end
