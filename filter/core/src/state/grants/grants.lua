-- grant uses (PERM-5): `grant:<id>` counts the calls a grant with a use limit has had
OPS.G = function(a)
  local gk = p .. 'grant:' .. a.grant
  local used = tonumber(redis.call('GET', gk)) or 0
  if used >= tonumber(a.max) then
    return {'exhausted', tostring(used)}
  end
  redis.call('INCR', gk)
end
