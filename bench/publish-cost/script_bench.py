#!/usr/bin/env python3
"""The publish script alone, on a redis-server of your own: one client sends script calls of N
messages each, one at a time (EVALSHA, waiting for each reply), round-robin into R rooms, with
one subscriber connection subscribed to every room channel (like a gateway) and drained. Prints
Redis's own CPU (used_cpu_user + used_cpu_sys) per message.

    script_bench.py PORT SCRIPT.lua LAYOUT N MESSAGES [ROOMS] [IDEM_MS] [LASTING]

SCRIPT.lua: the script as Redis runs it (prelude.lua followed by publish.lua).
LAYOUT: `records` (publish.lua's arguments since history entries hold the gateway's retry
records: a 5th header argument, the retry window, and flag 4), `batch` (the batched version's
arguments before that) or `single` (the earlier one-message-per-call arguments; N is then 1).
IDEM_MS: with `batch`, every message carries an idempotency record kept this long, as a
client publish does (the gateway numbers each connection's publishes for its retries; 30000
there); 0 or absent: none, as a server-API publish without a key. With a leading '+' (as the
gateway's first try sends it: a key never used before) the script does not look it up. With
`records`, the record is the message's history entry, as for the gateway's keys.
LASTING: 1 to mark a room `lasting` after its first publish, as a room-service does for the
rooms whose lifetimes it refreshed lately. Both are publish.lua's per-message flags (ARGV[4]),
so this runs scripts since those only."""
import os
import random
import socket
import sys
import threading
import time


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Connection:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read(self):
        line = self._line()
        kind = line[:1]
        if kind in (b"+", b":"):
            return line[1:]
        if kind == b"-":
            raise RuntimeError(line.decode())
        if kind == b"$":
            n = int(line[1:])
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            value, self.buf = self.buf[:n], self.buf[n + 2:]
            return value
        if kind == b"*":
            return [self.read() for _ in range(int(line[1:]))]
        raise RuntimeError(line)

    def call(self, *args):
        self.sock.sendall(encode(*args))
        return self.read()


def main():
    port, path, layout = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    n = 1 if layout == "single" else int(sys.argv[4])
    total = int(sys.argv[5])
    rooms = int(sys.argv[6]) if len(sys.argv) > 6 else 1000
    idem = sys.argv[7] if len(sys.argv) > 7 and sys.argv[7] not in ("", "0") else ""
    lasting = len(sys.argv) > 8 and sys.argv[8] == "1"
    refreshed = set()
    client = Connection(port)
    sha = client.call("SCRIPT", "LOAD", open(path).read()).decode()
    names = ["bench-%d-%d" % (os.getpid(), i) for i in range(rooms)]

    subscriber = Connection(port)
    for i in range(0, rooms, 200):
        channels = ["rc:room:%s" % r for r in names[i:i + 200]]
        subscriber.sock.sendall(encode("SUBSCRIBE", *channels))
        for _ in channels:
            subscriber.read()
    stop = threading.Event()

    def drain():
        subscriber.sock.settimeout(0.2)
        while not stop.is_set():
            try:
                if not subscriber.sock.recv(1 << 20):
                    return
            except socket.timeout:
                pass

    threading.Thread(target=drain, daemon=True).start()

    user, client_id = "load-1", "client-abcdef-1"
    data = '{"n":1,"text":"%s"}' % ("x" * 100)
    sender = ',"user":"%s","clientId":"%s","data":' % (user, client_id)
    tail = sender + data + "}"

    def keys(room):
        return ["rc:{%s}:epoch" % room, "rc:{%s}:seq" % room, "rc:{%s}:hist" % room]

    def single(room):
        return encode("EVALSHA", sha, 3, *keys(room), "%016x" % random.getrandbits(64),
                      3600000, 1000, "rc:room:" + room, '"%s"' % room, client_id, user, data, tail)

    numbered = 0

    def batch(batch_rooms):
        nonlocal numbered
        ks, args, flags = [], [], ""
        records = layout == "records"
        for room in batch_rooms:
            ks += keys(room)
            window, flag = "", 0
            if idem:
                numbered += 1
                unused = idem.startswith("+")
                if not (records and unused):
                    ks.append("rc:{%s}:idem:retry:%s:%d" % (room, client_id, numbered))
                window = str(numbered) if records else idem.lstrip("+")
                flag += 2 if unused else 0
                flag += 4 if records else 0
            flag += 1 if lasting and room in refreshed else 0
            refreshed.add(room)
            flags += str(flag)
            args += [3600000, 1000, "rc:room:" + room, '"%s"' % room, client_id, user, data, sender,
                     window]
        header = [len(batch_rooms), "%016x" % random.getrandbits(64), "PUBLISH", flags]
        if records:
            header.append(idem.lstrip("+") or 0)
        args = header + args
        return encode("EVALSHA", sha, len(ks), *ks, *args)

    sent = 0

    def send(count):
        nonlocal sent
        batch_rooms = [names[(sent + i) % rooms] for i in range(count)]
        sent += count
        if layout == "single":
            for room in batch_rooms:
                client.sock.sendall(single(room))
                client.read()
        else:
            client.sock.sendall(batch(batch_rooms))
            client.read()

    def cpu():
        text = client.call("INFO", "cpu").decode()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])

    send(rooms)  # every room exists before the measurement
    start_sent, c0, t0 = sent, cpu(), time.time()
    while sent - start_sent < total:
        send(n)
    c1, t1 = cpu(), time.time()
    stop.set()
    messages = sent - start_sent
    print(f"{layout} N={n}: {messages} messages in {t1 - t0:.1f} s, "
          f"Redis CPU {(c1 - c0) / messages * 1e6:.2f} us per message")


if __name__ == "__main__":
    main()
