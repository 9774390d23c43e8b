#!/usr/bin/env python3
"""Redis CPU per publish: runs a load generator command while sampling INFO cpu and INFO
commandstats of one or more Redis servers every 100 ms, then prints Redis's own CPU time
(used_cpu_user + used_cpu_sys) per publish, over the publishing window and over the whole run,
per server, with the commandstats deltas of the window.

    redis_cpu.py PORT[,PORT...] COUNTED -- COMMAND...

COUNTED: the commandstats name counted once per stored publish (`xadd` with history on).
The publishing window runs from the last sample before COUNTED started growing to the first
sample after it stopped. The sampler's own INFO calls are subtracted (their commandstats
time). COMMAND must print one JSON object last (loadgen --json)."""
import json
import socket
import subprocess
import sys
import threading
import time


def info(port, sections):
    with socket.create_connection(("127.0.0.1", port)) as s:
        args = ["INFO", *sections]
        s.sendall(("*%d\r\n" % len(args) + "".join(
            "$%d\r\n%s\r\n" % (len(a), a) for a in args)).encode())
        buf = b""
        while True:
            buf += s.recv(1 << 16)
            if b"\r\n" in buf:
                head = buf.index(b"\r\n")
                n = int(buf[1:head])
                if len(buf) >= head + 2 + n + 2:
                    break
    out = {}
    for line in buf[head + 2:head + 2 + n].decode().splitlines():
        if ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            out[key] = value
    return out


def sample(port):
    """(user s, sys s, {command: (calls, usec)})"""
    i = info(port, ["cpu", "commandstats"])
    commands = {}
    for key, value in i.items():
        if key.startswith("cmdstat_"):
            fields = dict(x.split("=") for x in value.split(","))
            commands[key[8:]] = (int(fields["calls"]), float(fields["usec"]))
    return float(i["used_cpu_user"]), float(i["used_cpu_sys"]), commands


def main():
    ports = [int(p) for p in sys.argv[1].split(",")]
    counted = sys.argv[2]
    command = sys.argv[sys.argv.index("--") + 1:]
    samples = []
    stop = threading.Event()

    def sampler():
        while not stop.is_set():
            started = time.time()
            samples.append((started, [sample(p) for p in ports]))
            time.sleep(max(0.0, 0.1 - (time.time() - started)))

    thread = threading.Thread(target=sampler)
    thread.start()
    time.sleep(0.3)
    proc = subprocess.run(command, capture_output=True, text=True)
    time.sleep(0.3)
    stop.set()
    thread.join()
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        sys.exit("the command printed no JSON report:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])

    def calls(s, name):
        return sum(server[2].get(name, (0, 0))[0] for server in s[1])

    growing = [i for i in range(1, len(samples))
               if calls(samples[i], counted) - calls(samples[i - 1], counted) > 5]
    if not growing:
        sys.exit(f"no {counted} calls seen")
    a, b = growing[0] - 1, growing[-1]

    def cpu(s0, s1, k):
        user = s1[1][k][0] - s0[1][k][0]
        sys_ = s1[1][k][1] - s0[1][k][1]
        info_usec = s1[1][k][2].get("info", (0, 0))[1] - s0[1][k][2].get("info", (0, 0))[1]
        return user - info_usec / 1e6, sys_

    published = report.get("published", 0)
    latency = report.get("latency_ms", {})
    print(f"published {published} ({report.get('published_per_sec')}/s), "
          f"received {report.get('received')} of {report.get('expected')}, loss {report.get('loss')}, "
          f"out of order {report.get('out_of_order')}, gaps {report.get('gaps')}, "
          f"latency p50 {latency.get('p50')} p99 {latency.get('p99')} max {latency.get('max')} ms")
    window_publishes = calls(samples[b], counted) - calls(samples[a], counted)
    total_user = total_sys = whole_user = whole_sys = 0.0
    for k, port in enumerate(ports):
        user, sys_ = cpu(samples[a], samples[b], k)
        wu, ws = cpu(samples[0], samples[-1], k)
        total_user += user
        total_sys += sys_
        whole_user += wu
        whole_sys += ws
        if len(ports) > 1:
            mine = samples[b][1][k][2].get(counted, (0, 0))[0] - samples[a][1][k][2].get(counted, (0, 0))[0]
            print(f"  redis :{port}: CPU {user + sys_:.3f} s (user {user:.3f}, sys {sys_:.3f}), "
                  f"{mine} publishes")
    print(f"window {samples[b][0] - samples[a][0]:.1f} s, {window_publishes} publishes: Redis CPU "
          f"{total_user + total_sys:.3f} s (user {total_user:.3f}, sys {total_sys:.3f}) = "
          f"{(total_user + total_sys) / max(window_publishes, 1) * 1e6:.1f} us per publish")
    print(f"whole run, {published} publishes: Redis CPU {whole_user + whole_sys:.3f} s = "
          f"{(whole_user + whole_sys) / max(published, 1) * 1e6:.1f} us per publish")
    rows = {}
    for k in range(len(ports)):
        for name, (c1, u1) in samples[b][1][k][2].items():
            c0, u0 = samples[a][1][k][2].get(name, (0, 0))
            if c1 > c0 and name != "info":
                prev = rows.get(name, (0, 0.0))
                rows[name] = (prev[0] + c1 - c0, prev[1] + u1 - u0)
    print("  commandstats in the window (usec: Redis's wall-clock time in the command):")
    for name, (n, usec) in sorted(rows.items(), key=lambda r: -r[1][1])[:10]:
        print(f"    {name:14s} calls {n:8d}  usec/call {usec / n:7.2f}")


if __name__ == "__main__":
    main()
