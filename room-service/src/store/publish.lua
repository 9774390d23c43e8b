-- Publish one message: assign the offset, append it to history and broadcast it, atomically,
-- so publish order on the room channel is offset order.
-- KEYS: 1 epoch, 2 seq, 3 hist, 4 (optional) idempotency record.
-- ARGV: 1 new epoch (used when the room has none), 2 ttl ms, 3 history size (0: keep none),
--       4 channel,
--       5 room as a JSON string, 6 sender client id, 7 user, 8 data json,
--       9 frame tail (roomcast_common::frame::message_frame_tail),
--       10 (with KEYS[4]) idempotency window ms.
-- Returns {epoch, offset}: with KEYS[4] already recorded, the first publish's, and nothing is
-- stored or broadcast again.
if KEYS[4] then
  local seen = redis.call('GET', KEYS[4])
  if seen then
    local space = string.find(seen, ' ', 1, true)
    if space then
      return {string.sub(seen, 1, space - 1), tonumber(string.sub(seen, space + 1))}
    end
  end
end
local ttl = ARGV[2]
local epoch = ensure_epoch(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ttl)
local offset = redis.call('INCR', KEYS[2])
local off = string.format('%d', offset)
local now = now_ms()
if ARGV[3] ~= '0' then
  redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[3], off .. '-0',
    'u', ARGV[7], 'c', ARGV[6], 'd', ARGV[8], 't', string.format('%d', now))
  trim_aged(KEYS[3], now - tonumber(ttl))
end
-- Frame and payload are byte-identical to roomcast_common::frame::message_frame and
-- roomcast_common::envelope::room_message (tests/redis_store.rs checks); epochs are plain hex.
local frame = '{"type":"message","room":' .. ARGV[5] .. ',"offset":' .. off ..
  ',"epoch":"' .. epoch .. '"' .. ARGV[9]
-- An empty channel: another broker (NATS) carries the broadcast; the caller publishes it.
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[4], 'M' .. off .. ' ' .. epoch .. ' ' .. ARGV[6] .. '\n' .. frame)
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
if KEYS[4] then
  redis.call('SET', KEYS[4], epoch .. ' ' .. off, 'PX', ARGV[10])
end
return {epoch, offset}
