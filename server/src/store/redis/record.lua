-- record(key, lease_token?, capture, retention): the `record` of server/src/store/mod.rs,
-- atomically.
--
-- KEYS[1]  the key's hash (see allocate.lua)
-- ARGV[1]  '1' when a token is presented, '0' when not (an old client: any live allocation)
-- ARGV[2]  the presented token
-- ARGV[3]  the retention, in ms
-- ARGV[4]  the capture, JSON (opaque here)
--
-- Returns {'stored', expires_at} | {'forbidden'}

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local entry = redis.call('HMGET', KEYS[1], 'state', 'expires_at', 'token')
local state, expires_at, token = entry[1], tonumber(entry[2]), entry[3]

-- Only a live allocation may be recorded: not a free key, not an expired lease (taken over or
-- not), not a completed capture (never overwritten).
if state ~= 'allocated' or not expires_at or now >= expires_at then
  return {'forbidden'}
end
-- With a token, only the lease's own.
if ARGV[1] == '1' and token ~= ARGV[2] then
  return {'forbidden'}
end

-- Completed: the capture, the allocation's fingerprint (kept in place), replayed for the
-- retention; Redis deletes the key itself at its end. The token is refused from now on.
local completed_until = now + tonumber(ARGV[3])
local at = string.format('%.0f', completed_until)
redis.call('HSET', KEYS[1], 'state', 'completed', 'expires_at', at, 'capture', ARGV[4])
redis.call('HDEL', KEYS[1], 'token')
redis.call('PEXPIREAT', KEYS[1], at)
return {'stored', completed_until}
