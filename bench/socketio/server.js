'use strict';
// Reference server for the benchmark comparison: Socket.IO v4 + @socket.io/redis-adapter, built
// the way the Socket.IO docs show it. Run two instances on one Redis:
//
//   PORT=7600 REDIS_URL=redis://127.0.0.1:7640 JWT_SECRET=s node server.js
//   PORT=7601 REDIS_URL=redis://127.0.0.1:7640 JWT_SECRET=s node server.js
//
// Events, equivalent to Roomcast's fan-out path:
//   handshake  auth: { token } (or ?token=): HS256 JWT with `sub`, verified with JWT_SECRET
//   "join"     room            -> ack { ok: true }             joins the room
//   "publish"  { room, data }  -> ack { ok: true } | { error }  broadcast to the room, sender excluded
//   "message"  { room, user, data }                            what the other members receive

const http = require('node:http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const { createClient } = require('redis');
const jwt = require('jsonwebtoken');

const PORT = Number(process.env.PORT || 7600);
const HOST = process.env.HOST || '127.0.0.1';
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';
const JWT_SECRET = process.env.JWT_SECRET;
if (!JWT_SECRET) {
  console.error('JWT_SECRET is required');
  process.exit(2);
}

async function main() {
  const pubClient = createClient({ url: REDIS_URL });
  const subClient = pubClient.duplicate();
  pubClient.on('error', (err) => console.error('redis pub client:', err.message));
  subClient.on('error', (err) => console.error('redis sub client:', err.message));
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer((req, res) => {
    if (req.url === '/healthz') {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end('ok\n');
      return;
    }
    res.writeHead(404);
    res.end();
  });
  const io = new Server(httpServer, { adapter: createAdapter(pubClient, subClient) });

  // Authentication at the handshake.
  io.use((socket, next) => {
    const token = socket.handshake.auth?.token || socket.handshake.query?.token;
    if (!token) return next(new Error('unauthorized: missing token'));
    jwt.verify(token, JWT_SECRET, { algorithms: ['HS256'] }, (err, claims) => {
      if (err || typeof claims.sub !== 'string') return next(new Error('unauthorized'));
      socket.data.user = claims.sub;
      next();
    });
  });

  io.on('connection', (socket) => {
    socket.on('join', (room, ack) => {
      if (typeof room !== 'string' || room.length === 0) {
        if (typeof ack === 'function') ack({ error: 'bad_request' });
        return;
      }
      socket.join(room);
      if (typeof ack === 'function') ack({ ok: true });
    });

    socket.on('leave', (room, ack) => {
      socket.leave(room);
      if (typeof ack === 'function') ack({ ok: true });
    });

    socket.on('publish', (msg, ack) => {
      const room = msg && msg.room;
      if (typeof room !== 'string' || !socket.rooms.has(room)) {
        if (typeof ack === 'function') ack({ error: 'not_joined' });
        return;
      }
      // To every member of the room on every instance (through Redis), except the sender.
      socket.to(room).emit('message', { room, user: socket.data.user, data: msg.data });
      if (typeof ack === 'function') ack({ ok: true });
    });
  });

  httpServer.listen(PORT, HOST, () => {
    console.log(`socket.io reference server on http://${HOST}:${PORT} (redis ${REDIS_URL}), pid ${process.pid}`);
  });

  const stop = () => {
    io.close();
    Promise.allSettled([pubClient.quit(), subClient.quit()]).finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
