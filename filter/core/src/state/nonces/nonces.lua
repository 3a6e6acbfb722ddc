-- nonces (ATK-1): `nonce:<key>` per recorded (app, nonce), living until its signature could no
-- longer be fresh; `horizon`, before which nothing is accepted (moved by a larger skew);
-- `share:<app>:<bucket>`, the nonces an app recorded in a lifetime-long bucket
OPS.N = function(a)
  local created = tonumber(a.created)
  local sk = tonumber(redis.call('GET', p .. 'skew')) or 0
  if skew > sk then
    redis.call('SET', p .. 'skew', skew)
    if sk > 0 and now - sk > h then
      h = now - sk
      redis.call('SET', hk, h)
    end
    sk = skew
  end
  if created <= h then
    return {'too_old', tostring(h)}
  end
  local nk = p .. 'nonce:' .. a.key
  if redis.call('EXISTS', nk) == 1 then
    return {'replayed'}
  end
  if a.record == '1' then
    -- a nonce lives at most `life` seconds, so an app's live nonces were all recorded in
    -- this lifetime-long bucket or the one before
    local b = math.floor(now / life)
    local qk = p .. 'share:' .. a.app .. ':'
    local held = (tonumber(redis.call('GET', qk .. b)) or 0)
      + (tonumber(redis.call('GET', qk .. (b - 1))) or 0)
    if held >= tonumber(a.share) then
      return {'full', tostring(held)}
    end
    local ttl = math.max(created + sk, now + life) - now
    if ttl < 1 then ttl = 1 end
    redis.call('SET', nk, created, 'EX', ttl)
    if redis.call('INCR', qk .. b) == 1 then
      redis.call('EXPIRE', qk .. b, 2 * life + 1)
    end
  end
end
