-- Leave: remove the member and announce it, only if it was there.
-- KEYS: 1 members. ARGV: 1 client id, 2 channel ('' when another broker announces it, or
-- when the room's namespace has member events off), 3 member_left payload, 4 the broadcast
-- command (PUBLISH, or SPUBLISH on a Redis Cluster).
-- Returns 1 when the member was removed.
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  if ARGV[2] ~= '' then
    redis.call(ARGV[4], ARGV[2], ARGV[3])
  end
  return 1
end
return 0
