-- Join: record the member (announcing it when new), keep the room's history alive, and read
-- what a reconnecting client missed, all at one instant.
-- KEYS: 1 epoch, 2 seq, 3 hist, 4 members.
-- ARGV: 1 new epoch, 2 ttl ms, 3 client id, 4 member json, 5 channel, 6 member_joined payload,
--       7 since epoch, 8 first missed offset ('' for no recovery), 9 history size (0: none),
--       10 the broadcast command (PUBLISH, or SPUBLISH on a Redis Cluster).
-- ARGV[5] is '' when another broker (NATS) announces the member instead, or when the room's
-- namespace has member events off.
-- Returns {epoch, latest offset, flat quadruples of the missed messages, 1 if the member is
-- new}; the messages are returned only when the epoch matches and history still holds the
-- first missed offset.
local ttl = ARGV[2]
local size = ARGV[9]
local epoch = touch_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ttl)
local now = now_ms()
local probe = KEYS[2]
if size ~= '0' then
  probe = KEYS[3]
end
keep_alive(KEYS[2], KEYS[3], probe, ttl, now)
local new_member = call('HSET', KEYS[4], ARGV[3], ARGV[4])
if new_member == 1 and ARGV[5] ~= '' then
  call(ARGV[10], ARGV[5], ARGV[6])
end
local latest = call('GET', KEYS[2]) or '0'
local missed = {}
local first = tonumber(ARGV[8])
if first and size ~= '0' and ARGV[7] == epoch and first >= read_floor(latest, size)
    and first <= tonumber(latest) then
  trim_aged(KEYS[3], now - tonumber(ttl))
  local id = string.format('%d', first) .. '-0'
  if #call('XRANGE', KEYS[3], id, id) == 1 then
    push_entries(missed, call('XRANGE', KEYS[3], id, '+', 'COUNT', size))
  end
end
return {epoch, latest, missed, new_member}
