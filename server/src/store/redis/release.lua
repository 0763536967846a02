-- release(key, lease_token?): the `release` of server/src/store/mod.rs, atomically.
--
-- KEYS[1]  the key's hash (see allocate.lua)
-- ARGV[1]  '1' when a token is presented, '0' when not
-- ARGV[2]  the presented token
--
-- Returns {'released'} | {'forbidden'}

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local entry = redis.call('HMGET', KEYS[1], 'state', 'expires_at', 'token')
local state, expires_at, token = entry[1], tonumber(entry[2]), entry[3]

-- The record rule: a live allocation, held with this token (or no token presented).
if state ~= 'allocated' or not expires_at or now >= expires_at then
  return {'forbidden'}
end
if ARGV[1] == '1' and token ~= ARGV[2] then
  return {'forbidden'}
end

-- Free: the key and its token are gone.
redis.call('DEL', KEYS[1])
return {'released'}
