-- History: messages from a start id on, oldest first.
-- KEYS: 1 epoch, 2 seq, 3 hist.
-- ARGV: 1 new epoch, 2 ttl ms, 3 start id ('-' for all, '' for none), 4 count.
-- Returns {epoch, latest offset, flat quadruples}.
local epoch = ensure_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
trim_aged(KEYS[3], now_ms() - tonumber(ARGV[2]))
local latest = redis.call('GET', KEYS[2]) or '0'
local out = {}
if ARGV[3] ~= '' then
  push_entries(out, redis.call('XRANGE', KEYS[3], ARGV[3], '+', 'COUNT', ARGV[4]))
end
return {epoch, latest, out}
