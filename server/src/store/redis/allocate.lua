-- allocate(key, fingerprint?, lease): the `allocate` of server/src/store/mod.rs, atomically.
--
-- KEYS[1]  the key's hash: state, expires_at (ms), token, fingerprint, capture (JSON)
-- ARGV[1]  the presented fingerprint ('' = none)
-- ARGV[2]  the lease, in ms
-- ARGV[3]  a new lease token (used only if the key is free)
-- ARGV[4]  the takeover window, in ms: how long past its lease the key is kept, so that the
--          allocation that takes an expired lease over is told so
--
-- Returns {'allocated', lease_expires_at, taken_over (1 or 0)} | {'in_flight', lease_expires_at}
--       | {'completed', capture_json} | {'mismatch'} | {'corrupt', why}

-- The store's clock: Redis's own, in ms since the Unix epoch, so that every server process
-- sharing this Redis (and its key expiry) uses the same one. (Redis 7 replicates a script's
-- effects, not the script, so TIME before a write is allowed.)
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local entry = redis.call('HMGET', KEYS[1], 'state', 'expires_at', 'fingerprint')
local state, expires_at, fingerprint = entry[1], entry[2], entry[3]

if state then
  expires_at = tonumber(expires_at)
  if not expires_at then
    return {'corrupt', 'an entry without expires_at'}
  end
  -- Live until its expiry; from that millisecond on the key is free (below), whether or not
  -- Redis has deleted it yet.
  if now < expires_at then
    -- Fingerprints: compared only when both are present, and before anything else.
    if fingerprint and fingerprint ~= '' and ARGV[1] ~= '' and fingerprint ~= ARGV[1] then
      return {'mismatch'}
    end
    if state == 'allocated' then
      return {'in_flight', expires_at}
    end
    if state == 'completed' then
      return {'completed', redis.call('HGET', KEYS[1], 'capture')}
    end
    return {'corrupt', 'an entry in state ' .. state}
  end
end

-- Free (no entry, or an expired lease or capture): a new lease. The old entry, its token and
-- its fingerprint are forgotten (an expired lease is taken over); Redis deletes the key itself
-- a takeover window after the lease's end (the key is free from the lease's end all the same).
local taken_over = 0
if state == 'allocated' then
  taken_over = 1
end
local lease_expires_at = now + tonumber(ARGV[2])
local at = string.format('%.0f', lease_expires_at)
local purge_at = string.format('%.0f', lease_expires_at + tonumber(ARGV[4]))
redis.call('DEL', KEYS[1])
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'state', 'allocated', 'expires_at', at, 'token', ARGV[3],
    'fingerprint', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'state', 'allocated', 'expires_at', at, 'token', ARGV[3])
end
redis.call('PEXPIREAT', KEYS[1], purge_at)
return {'allocated', lease_expires_at, taken_over}
