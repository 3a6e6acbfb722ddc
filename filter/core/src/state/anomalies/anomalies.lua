-- anomaly counters (MON-3, MON-6): `vol:<rule>:<app>:<bucket>` calls and bytes toward a
-- bulk-pull rule; `src:<rule>:<app>` the sources an app was seen from, by when; `kf:...` the
-- signature failures under a valid key id, all sources and each source's own
-- V: a call toward a bulk-pull rule
OPS.V = function(a)
  local vk = p .. 'vol:' .. a.rule .. ':' .. a.app .. ':' .. a.bucket
  local v = redis.call('HMGET', vk, 'c', 'b')
  local calls = tonumber(v[1]) or 0
  local bytes = tonumber(v[2]) or 0
  local over = calls >= tonumber(a.max_calls) or bytes > tonumber(a.max_bytes)
  if over and a.block == '1' then
    return {'blocked', a.rule, tostring(calls), tostring(bytes)}
  end
  redis.call('HINCRBY', vk, 'c', 1)
  redis.call('EXPIRE', vk, tonumber(a.window) + 60)
  if over then
    table.insert(out, 'anomaly')
    table.insert(out, a.rule)
  end
end
-- VB: a response's bytes, added to its window
OPS.VB = function(a)
  local vk = p .. 'vol:' .. a.rule .. ':' .. a.app .. ':' .. a.bucket
  redis.call('HINCRBY', vk, 'b', a.bytes)
  redis.call('EXPIRE', vk, tonumber(a.window) + 60)
end
-- NS: the source of an app's call
OPS.NS = function(a)
  local sk = p .. 'src:' .. a.rule .. ':' .. a.app
  local forget = tonumber(a.forget)
  local max = tonumber(a.max)
  local last = tonumber(redis.call('HGET', sk, a.source))
  if last and now - last < forget then
    if now - last >= 3600 then
      redis.call('HSET', sk, a.source, now)
      redis.call('EXPIRE', sk, forget)
    end
    return nil
  end
  local learning = a.learning == '1'
  if a.block == '1' and not learning then
    return {'blocked', a.rule}
  end
  if redis.call('HLEN', sk) >= max then
    local all = redis.call('HGETALL', sk)
    local oldest, at = nil, nil
    for j = 1, #all, 2 do
      local t = tonumber(all[j + 1]) or 0
      if now - t >= forget then
        redis.call('HDEL', sk, all[j])
      elseif not at or t < at then
        oldest, at = all[j], t
      end
    end
    if oldest and redis.call('HLEN', sk) >= max then
      redis.call('HDEL', sk, oldest)
    end
  end
  redis.call('HSET', sk, a.source, now)
  redis.call('EXPIRE', sk, forget)
  if not learning then
    table.insert(out, 'anomaly')
    table.insert(out, a.rule)
  end
end
-- KF: a signature that did not verify under a valid key id; from the threshold on (all
-- sources), an anomaly; a blocking rule bans the source once its own failures reach the
-- threshold (ban_subject is empty otherwise)
OPS.KF = function(a)
  local kk = p .. 'kf:' .. a.rule .. ':' .. a.app .. ':' .. redis.sha1hex(a.keyid) .. ':' .. a.bucket
  local n = redis.call('INCR', kk)
  if n == 1 then
    redis.call('EXPIRE', kk, tonumber(a.window) + 60)
  end
  local s = a.ban_subject
  local from = 0
  if s ~= '' then
    -- the same failures from this source alone: only they ban it (key ids are public; a
    -- stranger's failures must not ban the partner's own address)
    local sk = kk .. ':' .. redis.sha1hex(s)
    from = redis.call('INCR', sk)
    if from == 1 then
      redis.call('EXPIRE', sk, tonumber(a.window) + 60)
    end
  end
  if n >= tonumber(a.threshold) then
    table.insert(out, 'anomaly')
    table.insert(out, a.rule)
    if s ~= '' and from >= tonumber(a.threshold) and not live_ban(s, a.lift) then
      local ban = tonumber(a.ban_seconds)
      impose(s, ban)
      table.insert(out, 'ban')
      table.insert(out, s)
      table.insert(out, tostring(ban))
      table.insert(out, a.rule)
    end
  end
end
