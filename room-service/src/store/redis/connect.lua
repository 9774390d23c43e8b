-- Count connections against their users' limits, each atomically with its check.
-- ARGV: 1 connection count n, then 3 per connection: +1 client id, +2 gateway id,
--       +3 limit (0: none).
-- KEYS, per connection: the user's connections (hash client id -> gateway id).
-- Returns per connection its user's connection count with it, or -count when the limit
-- refused it. A connection already counted is counted once (its gateway is kept).
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  local key, client_id = KEYS[i], ARGV[3 * i - 1]
  local limit = tonumber(ARGV[3 * i + 1])
  local count = redis.call('HLEN', key)
  if limit > 0 and count >= limit and redis.call('HEXISTS', key, client_id) == 0 then
    out[i] = -count
  elseif redis.call('HSETNX', key, client_id, ARGV[3 * i]) == 1 then
    out[i] = count + 1
  else
    out[i] = count
  end
end
return out
