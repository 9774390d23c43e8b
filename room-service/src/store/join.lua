-- Join: record the member (announcing it when new), keep the room's history alive, and read
-- what a reconnecting client missed, all at one instant.
-- KEYS: 1 epoch, 2 seq, 3 hist, 4 members.
-- ARGV: 1 new epoch, 2 ttl ms, 3 client id, 4 member json, 5 channel, 6 member_joined payload,
--       7 since epoch, 8 first missed id (<since+1>-0, '' for no recovery), 9 history size.
-- ARGV[5] is '' when another broker (NATS) announces the member instead, or when the room's
-- namespace has member events off.
-- Returns {epoch, latest offset, flat quadruples of the missed messages, 1 if the member is new}; the messages are
-- returned only when the epoch matches and history still holds the first missed offset.
local ttl = ARGV[2]
local epoch = ensure_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
local new_member = redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
if new_member == 1 and ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
trim_aged(KEYS[3], now_ms() - tonumber(ttl))
local latest = redis.call('GET', KEYS[2]) or '0'
local missed = {}
local first = ARGV[8]
if first ~= '' and ARGV[7] == epoch then
  if #redis.call('XRANGE', KEYS[3], first, first) == 1 then
    push_entries(missed, redis.call('XRANGE', KEYS[3], first, '+', 'COUNT', ARGV[9]))
  end
end
return {epoch, latest, missed, new_member}
