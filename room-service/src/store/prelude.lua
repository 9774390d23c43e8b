-- Shared by the room scripts (prepended to each). A room's keys share one hash tag:
-- rc:{<room>}:epoch, rc:{<room>}:seq, rc:{<room>}:hist (a stream with ids <offset>-0 and fields
-- u = user, c = client id, d = data json, t = unix ms), rc:{<room>}:members.

-- Unix milliseconds from the Redis clock, the one clock every room-service instance shares.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The room's epoch, created when missing. A missing epoch means the history was lost (keys
-- expired, Redis flushed or restarted), so the offset and the stream start over with it.
local function ensure_epoch(epoch_key, seq_key, hist_key, new_epoch, ttl_ms)
  local epoch = redis.call('GET', epoch_key)
  if epoch and string.match(epoch, '^[0-9a-f]+$') then
    return epoch
  end
  redis.call('DEL', seq_key, hist_key)
  redis.call('SET', epoch_key, new_epoch, 'PX', ttl_ms)
  return new_epoch
end

local function entry_time(entry)
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 't' then
      return tonumber(fields[i + 1]) or 0
    end
  end
  return 0
end

-- Deletes entries not newer than cutoff_ms. Entries are appended in time order, so the aged
-- ones are a prefix and the scan stops at the first fresh entry.
local function trim_aged(hist_key, cutoff_ms)
  -- Usually the oldest entry is fresh: one entry read instead of a batch on every publish.
  local oldest = redis.call('XRANGE', hist_key, '-', '+', 'COUNT', 1)
  if #oldest == 0 or entry_time(oldest[1]) > cutoff_ms then
    return
  end
  while true do
    local batch = redis.call('XRANGE', hist_key, '-', '+', 'COUNT', 64)
    local aged = {}
    for _, entry in ipairs(batch) do
      if entry_time(entry) > cutoff_ms then
        break
      end
      aged[#aged + 1] = entry[1]
    end
    if #aged > 0 then
      redis.call('XDEL', hist_key, unpack(aged))
    end
    if #aged < 64 then
      return
    end
  end
end

-- Appends stream entries to out as flat quadruples: offset, user, client id, data json.
local function push_entries(out, entries)
  for _, entry in ipairs(entries) do
    local f = {}
    local fields = entry[2]
    for i = 1, #fields, 2 do
      f[fields[i]] = fields[i + 1]
    end
    out[#out + 1] = string.match(entry[1], '^(%d+)-') or '0'
    out[#out + 1] = f.u or ''
    out[#out + 1] = f.c or ''
    out[#out + 1] = f.d or 'null'
  end
end
