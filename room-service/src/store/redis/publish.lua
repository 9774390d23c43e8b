-- Publish a batch of messages, in order: for each, assign the offset, append it to history and
-- broadcast it, atomically, so publish order on a room's channel is offset order.
-- ARGV: 1 message count, 2 new epoch (for a room that has none), 3 the broadcast command
--       (PUBLISH, or SPUBLISH on a Redis Cluster), 4 one digit per message, the sum of
--       1: `lasting`, the caller refreshed the room lately: the epoch is read, not refreshed,
--          and the offset's and stream's expiry is not checked (see prelude.lua);
--       2: its idempotency key was never used before (the gateway's first try with a key of
--          its own): nothing to look up, the record is only written;
--       4: its record is its history entry (a gateway's retry key, see find_try): field n
--          holds the try's number, given as +9, and no record key is written;
--       5 the retry window ms (how far back find_try looks),
--       then 9 per message:
--       +1 ttl ms, +2 history size (0: keep none),
--       +3 channel ('' when another broker, NATS, carries the broadcast: the caller publishes),
--       +4 room as a JSON string, +5 sender client id, +6 user, +7 data json,
--       +8 the frame's sender part (roomcast_common::frame::message_frame_sender),
--       +9 idempotency window ms ('' for none), or with 4 the try's number.
-- KEYS, per message: epoch, seq, hist, and the idempotency record when it has a window and is
-- looked up or written (not with 4 + 2).
-- Returns flat {epoch, offset, fresh} per message; with its idempotency record already there,
-- the first publish's epoch and offset and fresh 0: nothing stored or broadcast again; fresh 2
-- (and no epoch) when history can no longer tell whether a first try was stored.

-- A history entry that is a retry record (4 above) names its connection (c) and try (n).
local UNSURE = {}

-- Looks for a gateway's first try in the room's history, newest first, back to since_ms (the
-- retry window). Returns 'epoch offset' when it is there, nil when it is not, and UNSURE when
-- the stream lost entries that could have held it: trimmed to size because more than size
-- publishes came between the tries. Entries removed otherwise aged out, which takes longer
-- than the window (the caller sends 4 only for rooms whose ttl is at least the window).
local function find_try(epoch_key, hist_key, client_id, nth, since_ms, size)
  local epoch = call('GET', epoch_key)
  if not valid_epoch(epoch) then
    return nil
  end
  local last, count, oldest = '+', 0, nil
  while true do
    local page = call('XREVRANGE', hist_key, last, '-', 'COUNT', 100)
    for _, entry in ipairs(page) do
      local fields = entry[2]
      local c, n, t
      for j = 1, #fields, 2 do
        local name = fields[j]
        if name == 'n' then
          n = fields[j + 1]
        elseif name == 'c' then
          c = fields[j + 1]
        elseif name == 't' then
          t = tonumber(fields[j + 1])
        end
      end
      if n == nth and c == client_id then
        return epoch .. ' ' .. string.match(entry[1], '^(%d+)-')
      end
      if t and t < since_ms then
        return nil
      end
      oldest = entry[1]
    end
    count = count + #page
    if #page < 100 then
      break
    end
    last = '(' .. page[#page][1]
  end
  if oldest == nil or string.match(oldest, '^(%d+)-') == '1' or count < size then
    return nil
  end
  return UNSURE
end

local n = tonumber(ARGV[1])
local new_epoch = ARGV[2]
local broadcast = ARGV[3]
local flags = ARGV[4]
local retry_window = tonumber(ARGV[5])
local now = now_ms()
local stamp = string.format('%d', now)
local out = {}
local k = 0
for i = 0, n - 1 do
  local a = 5 + i * 9
  local flag = string.byte(flags, i + 1) - 48
  local in_history = flag >= 4
  if in_history then
    flag = flag - 4
  end
  local unused = flag >= 2
  local epoch_key, seq_key, hist_key = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  k = k + 3
  local idem_key, seen = nil, nil
  if ARGV[a + 9] ~= '' and not (in_history and unused) then
    k = k + 1
    idem_key = KEYS[k]
  end
  if not unused and idem_key then
    -- A record key: written by this script without 4, or by an older version of it.
    seen = call('GET', idem_key)
    if not seen and in_history then
      seen = find_try(epoch_key, hist_key, ARGV[a + 5], ARGV[a + 9], now - retry_window,
        tonumber(ARGV[a + 2]))
    end
  end
  local space = seen and seen ~= UNSURE and string.find(seen, ' ', 1, true)
  if seen == UNSURE then
    out[#out + 1] = ''
    out[#out + 1] = 0
    out[#out + 1] = 2
  elseif space then
    out[#out + 1] = string.sub(seen, 1, space - 1)
    out[#out + 1] = tonumber(string.sub(seen, space + 1))
    out[#out + 1] = 0
  else
    local ttl, size, channel = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
    local lasting = flag % 2 == 1
    local epoch
    if lasting then
      epoch = call('GET', epoch_key)
      if not valid_epoch(epoch) then
        epoch = new_room(epoch_key, seq_key, hist_key, new_epoch, ttl)
      end
    else
      epoch = touch_epoch(epoch_key, seq_key, hist_key, new_epoch, ttl)
    end
    local offset = call('INCR', seq_key)
    if offset == 1 and lasting then
      -- New keys (the room started over, maybe on a read): whatever the caller knew, they
      -- need their lifetimes.
      call('PEXPIRE', epoch_key, (epoch_life(ttl)))
      lasting = false
    end
    local off = string.format('%d', offset)
    local client_id = ARGV[a + 5]
    local probe = seq_key
    if in_history then
      call('XADD', hist_key, 'MAXLEN', '~', size, off,
        'u', ARGV[a + 6], 'c', client_id, 'd', ARGV[a + 7], 't', stamp, 'n', ARGV[a + 9])
      probe = hist_key
    elseif size ~= '0' then
      call('XADD', hist_key, 'MAXLEN', '~', size, off,
        'u', ARGV[a + 6], 'c', client_id, 'd', ARGV[a + 7], 't', stamp)
      probe = hist_key
    end
    -- Payload and frame are byte-identical to roomcast_common::envelope::room_message and
    -- roomcast_common::frame::message_frame (tests/redis_store.rs checks); epochs are hex.
    if channel ~= '' then
      call(broadcast, channel, 'M' .. off .. ' ' .. epoch .. ' ' .. client_id .. '\n' ..
        '{"type":"message","room":' .. ARGV[a + 4] .. ',"offset":' .. off ..
        ',"epoch":"' .. epoch .. '"' .. ARGV[a + 8] .. ARGV[a + 7] .. '}')
    end
    if not lasting then
      keep_alive(seq_key, hist_key, probe, ttl, now)
    end
    if idem_key and not in_history then
      call('SET', idem_key, epoch .. ' ' .. off, 'PX', ARGV[a + 9])
    end
    out[#out + 1] = epoch
    out[#out + 1] = offset
    out[#out + 1] = 1
  end
end
return out
