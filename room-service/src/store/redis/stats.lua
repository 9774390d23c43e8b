-- Room stats without creating anything. KEYS: 1 epoch, 2 seq, 3 hist.
-- ARGV: 1 ttl ms, 2 history size.
-- Returns {epoch or '', latest offset, messages history holds}.
local epoch = call('GET', KEYS[1])
if not epoch then
  return {'', '0', 0}
end
trim_aged(KEYS[3], now_ms() - tonumber(ARGV[1]))
return {epoch, call('GET', KEYS[2]) or '0', math.min(call('XLEN', KEYS[3]), tonumber(ARGV[2]))}
