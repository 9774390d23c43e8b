-- Count a connection against its user's limit, atomically with the check.
-- KEYS: 1 the user's connections (hash client id -> gateway id).
-- ARGV: 1 client id, 2 gateway id, 3 limit (0: none).
-- Returns the user's connection count with this one, or -count when the limit refused it.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return redis.call('HLEN', KEYS[1])
end
local count = redis.call('HLEN', KEYS[1])
local limit = tonumber(ARGV[3])
if limit > 0 and count >= limit then
  return -count
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return count + 1
