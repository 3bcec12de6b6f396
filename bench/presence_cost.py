#!/usr/bin/env python3
"""What "listening now" costs a farm: Redis commands per second from the presence exchange, and
`listeners` frames during a reconnect storm.

    python3 bench/presence_cost.py FANFARE_BIN [sockets] [tracks]

Starts redis-server and 3 nodes on loopback (free ports), opens `sockets` WebSockets spread over
the nodes and `tracks` tracks (30 of them watchers that asked for `listeners` frames), then
measures over 20 s idle, a reconnect storm (every non-watcher socket closes and reconnects at
once) and 10 s after it: Redis commands/s (INFO commandstats), `listeners` frames the watchers
received, and the nodes' CPU seconds. Everything it starts is stopped by pid at the end.
"""
import asyncio, json, os, signal, subprocess, sys, tempfile, time

import websockets

from loopback import free_port, wait_port

BIN = sys.argv[1]
SOCKETS = int(sys.argv[2]) if len(sys.argv) > 2 else 6000
TRACKS = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
WATCHERS = 30


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_commands(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"],
                         capture_output=True, text=True, check=True).stdout
    total, by = 0, {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line[8:].split(":", 1)
            calls = int(rest.split("calls=")[1].split(",")[0])
            by[name] = calls
            total += calls
    return total, by


async def connect(addr, user, track, watch):
    ws = await websockets.connect(f"ws://{addr}/v1/ws?user={user}", max_queue=None, open_timeout=30)
    await ws.recv()  # welcome
    await ws.send(json.dumps({"type": "subscribe", "track": track, "listeners": watch}))
    return ws


async def main():
    procs = []
    tmp = tempfile.mkdtemp()
    rport = free_port()
    procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
    await wait_port(rport)
    addrs = []
    for i in range(3):
        port = free_port()
        procs.append(subprocess.Popen(
            [BIN, "--listen", f"127.0.0.1:{port}", "--data-dir", f"{tmp}/n{i}", "--log", "warn",
             "--redis", f"redis://127.0.0.1:{rport}", "--insecure-dev-auth",
             "--max-connections-per-ip", "100000", "--max-connections-per-user", "100000",
             "--heartbeat-timeout", "600000"],
            stdout=subprocess.DEVNULL))
        await wait_port(port)
        addrs.append(f"127.0.0.1:{port}")
    nodes = procs[1:]
    try:
        watchers = [await connect(addrs[i % 3], f"w{i}", f"t{i % TRACKS}", True) for i in range(WATCHERS)]
        others = []
        for start in range(0, SOCKETS, 500):
            others += await asyncio.gather(*[
                connect(addrs[i % 3], f"u{i}", f"t{i % TRACKS}", False)
                for i in range(start, min(start + 500, SOCKETS))])
        frames = {"listeners": 0}

        async def drain(ws):
            async for message in ws:
                if json.loads(message).get("type") == "listeners":
                    frames["listeners"] += 1

        tasks = [asyncio.create_task(drain(ws)) for ws in watchers]
        await asyncio.sleep(5)  # every node has exchanged at least twice

        def snapshot():
            return time.time(), redis_commands(rport), [cpu_seconds(p.pid) for p in nodes], frames["listeners"]

        def report(label, a, b):
            seconds = b[0] - a[0]
            cmds = b[1][0] - a[1][0]
            by = {k: v - a[1][1].get(k, 0) for k, v in b[1][1].items() if v - a[1][1].get(k, 0)}
            cpu = [round(y - x, 2) for x, y in zip(a[2], b[2])]
            print(f"{label}: {seconds:.1f} s, Redis {cmds / seconds:.1f} commands/s {by}, "
                  f"node CPU s {cpu}, listeners frames to {WATCHERS} watchers: {b[3] - a[3]}")

        a = snapshot()
        await asyncio.sleep(20)
        b = snapshot()
        report(f"idle ({SOCKETS} sockets, {TRACKS} tracks, 3 nodes)", a, b)

        # Reconnect storm: every other socket closes and comes back at once.
        await asyncio.gather(*[ws.close() for ws in others])
        others = []
        for start in range(0, SOCKETS, 500):
            others += await asyncio.gather(*[
                connect(addrs[i % 3], f"u{i}", f"t{i % TRACKS}", False)
                for i in range(start, min(start + 500, SOCKETS))])
        back = time.time() - b[0]
        await asyncio.sleep(10)
        c = snapshot()
        report(f"storm (all {SOCKETS} back in {back:.1f} s) and 10 s after", b, c)
        for t in tasks:
            t.cancel()
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["rm", "-rf", tmp])


asyncio.run(main())
