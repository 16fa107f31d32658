-- Collie fleet holds: deployments a sidecar was told to stay away from (a
-- provider's Retry-After, an open breaker), shared so that the others stay
-- away too. One hash; per deployment, until when (the authority's clock,
-- in ms), the latest wins.
--
-- KEYS[1]: the holds hash. ARGV[1]: key ttl (s); then pairs of deployment
-- id, milliseconds to stay away from now. Returns pairs of deployment id,
-- milliseconds left, for every hold still running.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV, 2 do
  local untl = now + tonumber(ARGV[i + 1])
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if untl > cur then
    redis.call('HSET', KEYS[1], ARGV[i], string.format('%.0f', untl))
  end
end
local out = {}
local h = redis.call('HGETALL', KEYS[1])
for i = 1, #h, 2 do
  local untl = tonumber(h[i + 1])
  if untl <= now then
    redis.call('HDEL', KEYS[1], h[i])
  else
    out[#out + 1] = h[i]
    out[#out + 1] = string.format('%.0f', untl - now)
  end
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return out
