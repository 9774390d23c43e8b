-- History: messages from a first offset on, oldest first, within the room's bounds.
-- KEYS: 1 epoch, 2 seq, 3 hist.
-- ARGV: 1 new epoch, 2 ttl ms, 3 first offset wanted ('' for none), 4 count, 5 history size.
-- Returns {epoch, latest offset, flat quadruples}.
local epoch = ensure_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
local latest = call('GET', KEYS[2]) or '0'
local out = {}
local first = tonumber(ARGV[3])
if first then
  first = math.max(first, read_floor(latest, ARGV[5]))
  if first <= tonumber(latest) then
    trim_aged(KEYS[3], now_ms() - tonumber(ARGV[2]))
    local id = string.format('%d', first) .. '-0'
    push_entries(out, call('XRANGE', KEYS[3], id, '+', 'COUNT', ARGV[4]))
  end
end
return {epoch, latest, out}
