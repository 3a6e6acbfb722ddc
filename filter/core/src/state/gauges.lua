-- GA n (app lift)*n: the gauges, read only: bans in force on the apps and on sources, and
-- the nonces the apps hold in their shares (and the fullest share). Its words after `n` are
-- the pairs; it is the only operation of its batch.
OPS.GA = function(a)
  local i = a._i
  local n = tonumber(a.n)
  local b = math.floor(now / life)
  local apps, held, fullest = 0, 0, 0
  for j = 0, n - 1 do
    local app = ARGV[i + 2 + 2 * j]
    if live_ban('app/' .. app, ARGV[i + 3 + 2 * j]) then
      apps = apps + 1
    end
    local qk = p .. 'share:' .. app .. ':'
    local hd = (tonumber(redis.call('GET', qk .. b)) or 0) + (tonumber(redis.call('GET', qk .. (b - 1))) or 0)
    held = held + hd
    fullest = math.max(fullest, hd)
  end
  local ips = redis.call('ZCOUNT', bz, '(' .. now, '+inf')
  return {'gauges', tostring(apps), tostring(ips), tostring(held), tostring(fullest)}
end
