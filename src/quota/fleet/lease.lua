-- Collie fleet leases: one atomic step for one sidecar over some budget
-- windows and some per-minute rate buckets.
--
-- KEYS: the budget window hashes, then the rate bucket hashes.
-- ARGV: sidecar id, now (ms), lease ttl (ms), number of budget keys,
--   number of rate keys, budget key ttl (s), rate key ttl (s); then per
--   budget key 15 numbers — limit, total, acked, want, need, each for
--   requests, tokens and nanodollars (a limit below 0: that dimension is not
--   limited; total: the sidecar's use in the window so far; acked: the total
--   of the last call whose answer it had);
--   then per rate key 3 numbers — capacity per minute, want per minute,
--   cool-down (ms). A `now` of 0: the authority's own clock (TIME).
--
-- A budget hash holds `u` = "requests tokens nanodollars" used (reported)
-- by the fleet in the window, and per sidecar `s:<id>` = "expiry lease×3
-- credit×3 counted×3". Invariant: used + every lease <= limit, per
-- dimension, except for use reported beyond a lease (a request that used
-- more than it reserved). A lease whose sidecar stopped refreshing
-- expires: it counts as used (the sidecar may have spent it; nothing is
-- over-admitted), and is kept as that sidecar's credit, so what it
-- reports later is not counted twice; when it calls again, the credit
-- beyond what it still has in flight is given back. A sidecar that never
-- returns leaves its credit counted as used: the fleet under-admits by its
-- unspent lease, never over-admits.
--
-- Use is reported as a running total, and the authority keeps the total it
-- counted per sidecar (`counted`): a call whose answer was lost (a deadline
-- passed while Redis applied it) and whose use the sidecar reports again
-- counts nothing twice. A record with no lease and no credit is kept an
-- hour past its lease for that (`GRACE_MS`); a sidecar silent longer is
-- counted from its `acked` total.
--
-- A rate hash holds per sidecar `s:<id>` = "expiry want held floor
-- floor_until" in units per minute. Targets are a fair share of the
-- capacity over the live sidecars' wants (water-filling); a sidecar holds at
-- most its target and never more than the others have committed (held, or
-- given up less than a cool-down ago), so what is committed never adds up
-- to more than the capacity.
--
-- Returns, per budget key: lease×3, used×3, leased by all×3; per rate key:
-- held, live sidecars, held beyond what this sidecar had committed.

local sid = ARGV[1]
local now = tonumber(ARGV[2])
if now <= 0 then
  -- The authority's clock, so sidecars' clocks need not agree.
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ttl = tonumber(ARGV[3])
local nb = tonumber(ARGV[4])
local nr = tonumber(ARGV[5])
local budget_key_ttl = tonumber(ARGV[6])
local rate_key_ttl = tonumber(ARGV[7])
local me = 's:' .. sid
local out = {}
-- How long past its lease the record of a sidecar with nothing leased is
-- kept: the running total counted for it stays known that long.
local GRACE_MS = 3600000

local function nums(text, n)
  local t = {}
  for v in string.gmatch(text or '', '[^ ]+') do
    t[#t + 1] = tonumber(v)
  end
  for i = #t + 1, n do
    t[i] = 0
  end
  return t
end

-- A budget record that holds no lease and no credit.
local function empty(r)
  return r[2] == 0 and r[3] == 0 and r[4] == 0 and r[5] == 0 and r[6] == 0 and r[7] == 0
end

local function join(t)
  local parts = {}
  for i = 1, #t do
    parts[i] = string.format('%.0f', t[i])
  end
  return table.concat(parts, ' ')
end

local arg = 8
for k = 1, nb do
  local key = KEYS[k]
  local limit, total, acked, want, need = {}, {}, {}, {}, {}
  for d = 1, 3 do
    limit[d] = tonumber(ARGV[arg + d - 1])
    total[d] = tonumber(ARGV[arg + 2 + d])
    acked[d] = tonumber(ARGV[arg + 5 + d])
    want[d] = tonumber(ARGV[arg + 8 + d])
    need[d] = tonumber(ARGV[arg + 11 + d])
  end
  arg = arg + 15
  local h = redis.call('HGETALL', key)
  local used = {0, 0, 0}
  local records = {}
  for i = 1, #h, 2 do
    if h[i] == 'u' then
      used = nums(h[i + 1], 3)
    else
      records[h[i]] = nums(h[i + 1], 10)
    end
  end
  -- Expired leases count as used and become their sidecar's credit; the
  -- sidecars that called within a ttl are live and share what is free.
  local live = 0
  for field, r in pairs(records) do
    if r[1] < now then
      for d = 1, 3 do
        used[d] = used[d] + r[1 + d]
        r[4 + d] = r[4 + d] + r[1 + d]
        r[1 + d] = 0
      end
    elseif field ~= me then
      live = live + 1
    end
  end
  local own = records[me]
  if own == nil then
    own = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
    records[me] = own
  end
  live = live + 1
  -- This sidecar's use since what was counted of it (its record's running
  -- total, or the one it last heard of when its record is gone): what its
  -- credit does not cover is new use; it comes out of its lease.
  for d = 1, 3 do
    local report = math.max(0, total[d] - math.max(acked[d], own[7 + d]))
    own[7 + d] = math.max(own[7 + d], total[d])
    local absorbed = math.min(report, own[4 + d])
    own[4 + d] = own[4 + d] - absorbed
    local fresh = report - absorbed
    used[d] = used[d] + fresh
    own[1 + d] = math.max(0, own[1 + d] - fresh)
    -- A sidecar back after its lease expired has now reported all it
    -- settled; of its credit only what it still has in flight (its need)
    -- can be used yet: the rest goes back to the fleet.
    local keep = math.min(own[4 + d], math.max(need[d], 0))
    used[d] = math.max(0, used[d] - (own[4 + d] - keep))
    own[4 + d] = keep
  end
  local others = {0, 0, 0}
  for field, r in pairs(records) do
    if field ~= me then
      for d = 1, 3 do
        others[d] = others[d] + r[1 + d]
      end
    end
  end
  -- The new lease: what is wanted, from what nobody holds, no more than a
  -- fair part of it (as the budget runs out, leases shrink to what the
  -- sidecar needs now), and down to what is wanted when that is less.
  for d = 1, 3 do
    if limit[d] < 0 then
      own[1 + d] = 0
    elseif want[d] <= own[1 + d] then
      own[1 + d] = math.max(0, want[d])
    else
      local free = math.max(0, limit[d] - used[d] - others[d] - own[1 + d])
      local fair = math.max(need[d] - own[1 + d], math.ceil(free / math.max(live, 1)))
      own[1 + d] = own[1 + d] + math.max(0, math.min(want[d] - own[1 + d], free, fair))
    end
  end
  own[1] = now + ttl
  redis.call('HSET', key, 'u', join(used))
  for field, r in pairs(records) do
    if field ~= me and empty(r) and r[1] + GRACE_MS < now then
      redis.call('HDEL', key, field)
    else
      redis.call('HSET', key, field, join(r))
    end
  end
  redis.call('EXPIRE', key, budget_key_ttl)
  local leased = {0, 0, 0}
  for field, r in pairs(records) do
    for d = 1, 3 do
      leased[d] = leased[d] + r[1 + d]
    end
  end
  for d = 1, 3 do
    out[#out + 1] = own[1 + d]
  end
  for d = 1, 3 do
    out[#out + 1] = used[d]
  end
  for d = 1, 3 do
    out[#out + 1] = leased[d]
  end
end

for k = 1, nr do
  local key = KEYS[nb + k]
  local capacity = tonumber(ARGV[arg])
  local want = math.max(0, tonumber(ARGV[arg + 1]))
  local cooldown = tonumber(ARGV[arg + 2])
  arg = arg + 3
  local h = redis.call('HGETALL', key)
  local mine = {0, 0, 0, 0, 0}
  local wants, commits = {}, {}
  local held_by_others = 0
  for i = 1, #h, 2 do
    local r = nums(h[i + 1], 5)
    if h[i] == me then
      mine = r
    else
      -- A sidecar that stopped refreshing may have spent its share until
      -- its lease ended: what it held stays committed for a cool-down.
      if r[1] < now and r[3] > 0 then
        r[4] = math.max(r[3], r[4])
        r[5] = math.max(r[5], r[1] + cooldown)
        r[2] = 0
        r[3] = 0
        redis.call('HSET', key, h[i], join(r))
      end
      local committed = r[3]
      if r[5] >= now then
        committed = math.max(committed, r[4])
      end
      if r[1] < now and r[5] < now then
        redis.call('HDEL', key, h[i])
      else
        held_by_others = held_by_others + committed
        if r[1] >= now then
          wants[#wants + 1] = r[2]
        end
      end
    end
  end
  wants[#wants + 1] = want
  local n = #wants
  -- Water-filling over the live sidecars' wants: the smallest are met
  -- whole, the rest share what is left equally. This sidecar's target is
  -- the share of its own want.
  table.sort(wants)
  local left, target = capacity, 0
  for j = 1, n do
    local each = left / (n - j + 1)
    if wants[j] >= want then
      target = math.min(want, each)
      break
    end
    left = left - math.min(wants[j], each)
  end
  local floor, floor_until = mine[4], mine[5]
  if floor_until < now then
    floor = 0
  end
  local committed_before = math.max(mine[3], floor)
  -- A share grows by at most a fair part of what is free (so the first
  -- sidecar to ask does not take it all before the others have said what
  -- they want), and never past what the others have committed.
  local free = math.max(0, capacity - held_by_others - committed_before)
  local step = math.ceil(free / n)
  local held = math.floor(math.max(0, math.min(target, capacity - held_by_others,
    committed_before + step)))
  -- Capacity given up stays committed for a cool-down (the time the
  -- sidecar's bucket takes to refill), so what it already spent is not
  -- handed to another sidecar to spend again within the minute.
  if held < mine[3] then
    floor = math.max(floor, mine[3])
    floor_until = now + cooldown
  end
  redis.call('HSET', key, me, join({now + ttl, want, held, floor, floor_until}))
  redis.call('EXPIRE', key, rate_key_ttl)
  out[#out + 1] = held
  out[#out + 1] = n
  -- Only capacity beyond what this sidecar had committed is new to it: the
  -- rest it may have spent already, and its bucket must not get it twice.
  out[#out + 1] = math.max(0, held - committed_before)
end

return out
