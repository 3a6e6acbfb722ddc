-- bans (PERM-4, RL-3, MON-6): `ban:<subject>` holds "<began> <ends>" for a ban in force;
-- `count:<subject>` counts refusals in the window; `bans-ip` orders source bans by their end
-- (for the gauge: source bans have no fixed key set)
local bz = p .. 'bans-ip'
local function banned_ip(subject, untl)
  if string.sub(subject, 1, 3) == 'ip/' then
    redis.call('ZREMRANGEBYSCORE', bz, '-inf', now)
    redis.call('ZADD', bz, untl, subject)
    redis.call('EXPIRE', bz, 2592000)
  end
end
-- a ban in force on the subject that began at or after its lift time
local function live_ban(subject, lift)
  local v = redis.call('GET', p .. 'ban:' .. subject)
  if v then
    local at, untl = string.match(v, '^(%d+) (%d+)$')
    if at and tonumber(untl) > now and tonumber(at) >= tonumber(lift) then
      return untl
    end
  end
  return nil
end
local function impose(subject, seconds)
  redis.call('SET', p .. 'ban:' .. subject, now .. ' ' .. (now + seconds), 'EX', seconds)
  banned_ip(subject, now + seconds)
end
-- B: refused while a ban is in force
OPS.B = function(a)
  local untl = live_ban(a.subject, a.lift)
  if untl then
    return {'banned', a.subject, untl}
  end
end
-- R: one refusal; the threshold within the window starts a ban
OPS.R = function(a)
  local ck = p .. 'count:' .. a.subject
  local n = redis.call('INCR', ck)
  if n == 1 then
    redis.call('EXPIRE', ck, tonumber(a.window))
  end
  if n >= tonumber(a.threshold) then
    impose(a.subject, tonumber(a.ban))
    redis.call('DEL', ck)
    table.insert(out, 'ban')
    table.insert(out, a.subject)
    table.insert(out, a.ban)
    table.insert(out, '')
  end
end
