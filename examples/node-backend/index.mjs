// A backend calling Roomcast's server API (roomcast.v1.ServerApi) over gRPC.
//
//   ROOMCAST_SERVER_API=127.0.0.1:50051 API_KEY=... node index.mjs
//
// It publishes to a room (twice, with one idempotency key: the second call answers the first
// one's offset and delivers nothing), publishes three more in one PublishBatch call, reads presence, presence stats, history, the rooms and
// the cluster info, then disconnects a user. Every step prints one JSON line; any failure
// prints an `error` line on stderr and exits with status 1.
//
// Optional: ROOM (default "lobby"), DISCONNECT_USER (default "bob"), DISCONNECT_CODE (default
// 4000), ROOMCAST_TLS=1 (TLS with the system's roots instead of plaintext).

import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined || value === '') throw new Error(`${name} is not set`);
  return value;
};

// The .proto files are loaded at run time: no generated code. Copy proto/proto next to your
// backend and point this path at it.
const PROTO_ROOT = fileURLToPath(new URL('../../proto/proto', import.meta.url));
const definition = protoLoader.loadSync('roomcast/v1/server_api.proto', {
  includeDirs: [PROTO_ROOT],
  longs: Number, // offsets and counters as numbers
  defaults: true, // zero values present (offset 0, empty lists)
});
const { ServerApi } = grpc.loadPackageDefinition(definition).roomcast.v1;

const log = (step, fields) => console.log(JSON.stringify({ step, ...fields }));

// One unary call with the API key and a deadline; resolves to the response message.
function unary(client, method, request) {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${env('API_KEY')}`);
  const deadline = Date.now() + 5000;
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (err, response) => {
      if (err) reject(Object.assign(err, { method }));
      else resolve(response);
    });
  });
}

async function main(api) {
  const room = env('ROOM', 'lobby');
  const user = env('DISCONNECT_USER', 'bob');
  const code = Number(env('DISCONNECT_CODE', '4000'));

  // Publish, then retry with the same key: same offset, stored and delivered once. A real
  // backend retries this way after a timeout or UNAVAILABLE, keeping the key.
  const idempotencyKey = randomUUID();
  const publish = {
    room,
    dataJson: JSON.stringify({ text: 'hello from the backend', at: new Date().toISOString() }),
    user: 'backend', // shown as the message's `user`
    idempotencyKey,
  };
  const first = await unary(api, 'Publish', publish);
  log('publish', { room, idempotencyKey, epoch: first.epoch, offset: first.offset });
  const again = await unary(api, 'Publish', publish);
  log('publish_again', { room, idempotencyKey, offset: again.offset });
  if (again.offset !== first.offset || again.epoch !== first.epoch) {
    throw new Error(`the repeated publish got offset ${again.offset}, not ${first.offset}`);
  }

  // Many messages in one call (a feed bridge, a queue consumer): one result per message, in
  // order; in one room they get consecutive offsets in the call's order. A message that fails
  // (bad room, bad JSON) fails alone: check each result.
  const batch = await unary(api, 'PublishBatch', {
    publishes: [1, 2, 3].map((n) => ({
      room,
      dataJson: JSON.stringify({ text: `batch ${n}` }),
      user: 'backend',
    })),
  });
  const offsets = batch.results.map((result) => {
    if (result.error) throw new Error(`a batched publish failed: ${result.error.message}`);
    return result.published.offset;
  });
  log('publish_batch', { room, offsets });

  const { members } = await unary(api, 'Presence', { room });
  log('presence', { room, members });

  const stats = await unary(api, 'PresenceStats', { room });
  log('presence_stats', { room, connections: stats.connections, users: stats.users });

  // The last 10 messages; page with `since` = the last offset while `more` is true.
  const history = await unary(api, 'History', { room, limit: 10 });
  log('history', {
    room,
    epoch: history.epoch,
    offset: history.offset,
    messages: history.publications.map(({ offset, user, clientId, dataJson }) => ({
      offset, user, clientId, data: JSON.parse(dataJson),
    })),
    more: history.more,
  });

  const { rooms } = await unary(api, 'Rooms', { prefix: '', limit: 100 });
  log('rooms', { rooms });

  const info = await unary(api, 'Info', {});
  log('info', info);

  // Closes every connection of `user` on every gateway with `code`.
  await unary(api, 'Disconnect', { user, code, reason: 'disconnected by the example backend' });
  log('disconnect', { user, code });
}

let api;
try {
  const credentials = process.env.ROOMCAST_TLS === '1'
    ? grpc.credentials.createSsl()
    : grpc.credentials.createInsecure();
  api = new ServerApi(env('ROOMCAST_SERVER_API'), credentials);
  await main(api);
} catch (err) {
  // A gRPC error has `code` (a grpc.status number) and `details`.
  const status = err.code !== undefined ? grpc.status[err.code] : undefined;
  const message = err.details ?? err.message;
  console.error(JSON.stringify({ step: 'error', method: err.method, status, message }));
  process.exitCode = 1;
} finally {
  api?.close();
}
