-- sessions (SES-1..SES-5): a hash `session:<key>` per session (the key is a hash of its ID; the
-- ID is never sent), with a TTL a minute past the moment it would end; a sorted set `sessions`
-- by last use, for the bound and for evicting the one idle longest, and `sessions-app:<sha1>`
-- the same per app; `session-seq` numbers sessions in the order they are created; the end
-- marks `session-end:app:<sha1>` and `session-end:user:<sha1>` hold the number of the last
-- session created before an operator ended every session of that app or user. Ordering by
-- that number, not by time, makes an operator's end exact: a session created in the same
-- second, just after it, lives.
local zk = p .. 'sessions'
local function mark(kind, name)
  return tonumber(redis.call('GET', p .. 'session-end:' .. kind .. ':' .. redis.sha1hex(name))) or 0
end
-- a presented session (words key app ip mac ip_unbound idle lifetime): the session's fields
-- or a refusal; refreshed when `refresh`
local function session(a, refresh)
  local sk = p .. 'session:' .. a.key
  local idle = tonumber(a.idle)
  local slife = tonumber(a.lifetime)
  local s = redis.call('HMGET', sk, 'app', 'ip', 'mac', 'user', 'factors', 'created', 'last_seen', 'seq')
  if not s[1] or not s[6] or not s[7] or not s[8] then
    return nil, {'session', 'unknown'}
  end
  local created = tonumber(s[6])
  local last = tonumber(s[7])
  if now - created > slife then
    return nil, {'session', 'lifetime'}
  end
  if now - last > idle then
    return nil, {'session', 'idle', tostring(now - last)}
  end
  if s[1] ~= a.app then
    return nil, {'session', 'app'}
  end
  if s[2] ~= a.ip and a.ip_unbound ~= '1' then
    return nil, {'session', 'ip'}
  end
  if s[3] ~= a.mac then
    return nil, {'session', 'mac'}
  end
  local ended = mark('app', s[1])
  if s[4] and s[4] ~= '' then
    ended = math.max(ended, mark('user', s[4]))
  end
  if tonumber(s[8]) <= ended then
    return nil, {'session', 'operator'}
  end
  if refresh then
    s[7] = tostring(now)
    redis.call('HSET', sk, 'last_seen', now)
    redis.call('ZADD', zk, now, a.key)
    local ak = p .. 'sessions-app:' .. redis.sha1hex(s[1])
    redis.call('ZADD', ak, now, a.key)
    redis.call('EXPIRE', ak, idle + 60)
    redis.call('EXPIRE', sk, math.max(math.min(idle, created + slife - now), 0) + 60)
  end
  return s, nil
end
-- a session's fields in the answer (app, ip, mac, user, factors, created, last_seen)
local function answer_session(s)
  table.insert(out, 'session')
  for f = 1, 7 do
    table.insert(out, s[f] or '')
  end
end
-- S: a session used (refresh 1) or read (refresh 0); its fields go to the answer
OPS.S = function(a)
  local s, refusal = session(a, a.refresh == '1')
  if refusal then
    return refusal
  end
  answer_session(s)
end
-- SL: a user logged in on the session
OPS.SL = function(a)
  local _, refusal = session(a, false)
  if refusal then
    return refusal
  end
  redis.call('HSET', p .. 'session:' .. a.key, 'user', a.user, 'factors', a.factors)
end
-- SE: the caller ends its session; its fields go to the answer (the audit record's user)
OPS.SE = function(a)
  local s, refusal = session(a, false)
  if refusal then
    return refusal
  end
  redis.call('DEL', p .. 'session:' .. a.key)
  redis.call('ZREM', zk, a.key)
  redis.call('ZREM', p .. 'sessions-app:' .. redis.sha1hex(s[1]), a.key)
  answer_session(s)
end
-- SC: a session established. Establishes are bounded per app and per app and source in
-- fixed minutes; an app past its cap, or a store at its bound, evicts the app's own session
-- idle longest, never another app's (a store full of others' sessions refuses)
OPS.SC = function(a)
  local app = a.app
  local sk = p .. 'session:' .. a.key
  local idle = tonumber(a.idle)
  local bound = tonumber(a.bound)
  local cap = tonumber(a.max_per_app)
  local rk = p .. 'sess-rate:' .. redis.sha1hex(app) .. ':' .. math.floor(now / 60)
  local rs = rk .. ':' .. redis.sha1hex(a.ip)
  local by_app = redis.call('INCR', rk)
  if by_app == 1 then
    redis.call('EXPIRE', rk, 120)
  end
  local by_source = redis.call('INCR', rs)
  if by_source == 1 then
    redis.call('EXPIRE', rs, 120)
  end
  if by_app > tonumber(a.per_minute) then
    return {'session_rate', 'app', tostring(by_app)}
  end
  if by_source > tonumber(a.per_source_per_minute) then
    return {'session_rate', 'source', tostring(by_source)}
  end
  local ak = p .. 'sessions-app:' .. redis.sha1hex(app)
  redis.call('ZREMRANGEBYSCORE', zk, '-inf', '(' .. (now - idle))
  redis.call('ZREMRANGEBYSCORE', ak, '-inf', '(' .. (now - idle))
  redis.call('DEL', sk)
  redis.call('ZREM', zk, a.key)
  redis.call('ZREM', ak, a.key)
  local function evict_own()
    local oldest = redis.call('ZPOPMIN', ak)
    if not oldest[1] then
      return false
    end
    redis.call('ZREM', zk, oldest[1])
    if redis.call('DEL', p .. 'session:' .. oldest[1]) == 1 and out[#out] ~= 'evicted' then
      table.insert(out, 'evicted')
    end
    return true
  end
  local n = 0
  while redis.call('ZCARD', ak) >= cap and n < 64 do
    evict_own()
    n = n + 1
  end
  if redis.call('ZCARD', zk) >= bound and not evict_own() then
    return {'session_full'}
  end
  local seq = redis.call('INCR', p .. 'session-seq')
  redis.call('HSET', sk, 'app', app, 'ip', a.ip, 'mac', a.mac, 'user', a.user,
    'factors', a.factors, 'created', now, 'last_seen', now, 'seq', seq)
  redis.call('EXPIRE', sk, idle + 60)
  redis.call('ZADD', zk, now, a.key)
  redis.call('ZADD', ak, now, a.key)
  redis.call('EXPIRE', ak, idle + 60)
end
-- SR: an operator ends one session
OPS.SR = function(a)
  local owner = redis.call('HGET', p .. 'session:' .. a.key, 'app')
  if owner then
    redis.call('ZREM', p .. 'sessions-app:' .. redis.sha1hex(owner), a.key)
  end
  if redis.call('DEL', p .. 'session:' .. a.key) == 0 then
    table.insert(out, 'nothing')
  end
  redis.call('ZREM', zk, a.key)
end
-- SA: an operator ends every session of an app or a user created so far
OPS.SA = function(a)
  local seq = tonumber(redis.call('GET', p .. 'session-seq')) or 0
  redis.call('SET', p .. 'session-end:' .. a.kind .. ':' .. redis.sha1hex(a.name), seq,
    'EX', tonumber(a.lifetime) + 120)
end
