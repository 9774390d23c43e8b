-- Shared by the room scripts (prepended to each). A room's keys share one hash tag:
-- rc:{<room>}:epoch, rc:{<room>}:seq, rc:{<room>}:hist (a stream with ids <offset>-0 and fields
-- u = user, c = client id, d = data json, t = unix ms), rc:{<room>}:members.
--
-- Lifetimes: a publish or join that refreshes the room sets the epoch key to expire
-- epoch_life(ttl) = 1.25 ttl later (GETEX). A room-service that refreshed a room lately skips
-- the refresh for a fifth of a ttl (publish.lua, `lasting`: a GET instead, and no PTTL), so the
-- epoch still lives at least ttl after the last publish, at most 1.25 ttl. Offset and stream
-- outlive it (their expiry is pushed to epoch_life + ttl/2 when less than epoch_life is left);
-- a missing epoch makes them start over.
-- History bounds: the stream is trimmed approximately (XADD MAXLEN ~: whole nodes only, so it
-- may hold a few more entries than the size) and aged entries are deleted lazily; every read
-- enforces both bounds exactly (read_floor, trim_aged).

local call = redis.call

-- Unix milliseconds from the Redis clock, the one clock every room-service instance shares.
local function now_ms()
  local t = call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function valid_epoch(epoch)
  return epoch and string.match(epoch, '^[0-9a-f]+$')
end

-- How long the epoch lives after a refresh (see the top): as a command argument, and in ms.
-- Made once per script call and ttl: turning numbers into strings and back costs more than
-- the commands using them.
local lives, lives_ms = {}, {}
local function epoch_life(ttl_ms)
  local life = lives[ttl_ms]
  if not life then
    local ttl = tonumber(ttl_ms)
    lives_ms[ttl_ms] = ttl + math.floor(ttl / 4)
    life = string.format('%d', lives_ms[ttl_ms])
    lives[ttl_ms] = life
  end
  return life, lives_ms[ttl_ms]
end

-- Starts the room over under new_epoch: offset and stream are dropped with the old epoch.
local function new_room(epoch_key, seq_key, hist_key, new_epoch, ttl_ms)
  call('DEL', seq_key, hist_key)
  call('SET', epoch_key, new_epoch, 'PX', (epoch_life(ttl_ms)))
  return new_epoch
end

-- The room's epoch, created when missing, without extending its life (reads).
local function ensure_epoch(epoch_key, seq_key, hist_key, new_epoch, ttl_ms)
  local epoch = call('GET', epoch_key)
  if valid_epoch(epoch) then
    return epoch
  end
  return new_room(epoch_key, seq_key, hist_key, new_epoch, ttl_ms)
end

-- The room's epoch, its life extended to epoch_life from now (a publish or a join); created
-- when missing.
local function touch_epoch(epoch_key, seq_key, hist_key, new_epoch, ttl_ms)
  local epoch = call('GETEX', epoch_key, 'PX', (epoch_life(ttl_ms)))
  if valid_epoch(epoch) then
    return epoch
  end
  return new_room(epoch_key, seq_key, hist_key, new_epoch, ttl_ms)
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
  -- Usually the oldest entry is fresh: one entry read instead of a batch.
  local oldest = call('XRANGE', hist_key, '-', '+', 'COUNT', 1)
  if #oldest == 0 or entry_time(oldest[1]) > cutoff_ms then
    return
  end
  while true do
    local batch = call('XRANGE', hist_key, '-', '+', 'COUNT', 64)
    local aged = {}
    for _, entry in ipairs(batch) do
      if entry_time(entry) > cutoff_ms then
        break
      end
      aged[#aged + 1] = entry[1]
    end
    if #aged > 0 then
      call('XDEL', hist_key, unpack(aged))
    end
    if #aged < 64 then
      return
    end
  end
end

-- Keeps the offset and the stream alive past the epoch (see the top), touching them only when
-- probe_key (the stream, or the offset for a room without history) has less than the epoch's
-- life left; aged entries go at the same time.
local function keep_alive(seq_key, hist_key, probe_key, ttl_ms, now)
  local _, life = epoch_life(ttl_ms)
  if call('PTTL', probe_key) < life then
    local ttl = tonumber(ttl_ms)
    life = life + math.floor(ttl / 2)
    call('PEXPIRE', seq_key, life)
    call('PEXPIRE', hist_key, life)
    trim_aged(hist_key, now - ttl)
  end
end

-- The lowest offset history may serve: the stream can hold a few older ones (approximate
-- trimming), which are never returned.
local function read_floor(latest, size)
  return math.max(1, tonumber(latest) - tonumber(size) + 1)
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
