#!/usr/bin/env python3
"""Protocol v1 as an independent client sees it.

Drives the real `fanfare` binary with the Python `websockets` library (not our code) and checks
every frame against the exact shapes written in docs/protocol.md. Exits non-zero on any
difference. Usage: protocol_v1.py PATH_TO_FANFARE_BINARY
"""
import asyncio
import json
import subprocess
import sys
import tempfile

import websockets


def expect(actual, expected, what):
    if actual != expected:
        raise AssertionError(f"{what}:\n  expected {expected}\n  got      {actual}")
    print(f"ok  {what}")


async def recv(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def conversation(base):
    async with websockets.connect(f"{base}/v1/ws?user=ana") as ana, \
            websockets.connect(f"{base}/v1/ws?user=bob") as bob:
        expect(await recv(ana), {"type": "welcome", "user": "ana", "heartbeat_ms": 30000}, "welcome")
        await recv(bob)
        await bob.send(json.dumps({"type": "subscribe", "track": "T"}))
        expect(await recv(bob), {"type": "subscribed", "track": "T", "count": 0, "listeners": 1}, "subscribe")
        await ana.send(json.dumps({"type": "like", "track": "T", "id": "K"}))
        expect(await recv(ana), {"type": "ack", "id": "K", "track": "T", "count": 1, "duplicate": False}, "like ack")
        expect(await recv(bob), {"type": "likes", "track": "T", "count": 1, "delta": 1,
                                 "recent": [{"user": "ana", "id": "K", "action": "like"}], "listeners": 1},
               "likes update")
        await ana.send(json.dumps({"type": "like", "track": "T", "id": "K2"}))
        expect(await recv(ana), {"type": "ack", "id": "K2", "track": "T", "count": 1, "duplicate": True},
               "second like is a duplicate")
        await ana.send(json.dumps({"type": "unlike", "track": "T", "id": "K3"}))
        expect(await recv(ana), {"type": "ack", "id": "K3", "track": "T", "count": 0, "duplicate": False}, "unlike ack")
        expect((await recv(bob))["count"], 0, "update after unlike")
        # Listening now: a subscription that asks gets `listeners` frames when only the number
        # of listeners changes (checked every 2 s).
        await bob.send(json.dumps({"type": "subscribe", "track": "L", "listeners": True}))
        expect(await recv(bob), {"type": "subscribed", "track": "L", "count": 0, "listeners": 1},
               "subscribe asking for listener updates")
        await ana.send(json.dumps({"type": "subscribe", "track": "L"}))
        expect((await recv(ana))["listeners"], 2, "a second listener is counted")
        expect(await recv(bob), {"type": "listeners", "track": "L", "listeners": 2}, "listeners update")
        await bob.send(json.dumps({"type": "subscribe", "track": "L", "listeners": "yes"}))
        expect((await recv(bob))["code"], "bad_request", "listeners must be a boolean")
        await bob.send(json.dumps({"type": "unsubscribe", "track": "T"}))
        expect(await recv(bob), {"type": "unsubscribed", "track": "T"}, "unsubscribe")
        await bob.send(json.dumps({"type": "ping"}))
        expect(await recv(bob), {"type": "pong"}, "ping")
        await bob.send("{oops")
        error = await recv(bob)
        expect((error["type"], error["code"], "id" in error), ("error", "bad_request", False), "invalid JSON")
        await bob.send(json.dumps({"type": "like", "track": "bad track", "id": "K9"}))
        error = await recv(bob)
        expect((error["code"], error["id"]), ("bad_request", "K9"), "error carries the id")
        await bob.send(b"\x00\x01")
        expect((await recv(bob))["code"], "bad_request", "binary frame")
        await bob.send("x" * 5000)
        expect((await recv(bob))["code"], "too_large", "oversized frame error")
        try:
            await asyncio.wait_for(bob.recv(), 10)
            raise AssertionError("connection should close after an oversized frame")
        except websockets.ConnectionClosed as closed:
            expect(closed.rcvd.code, 1009, "oversized frame closes with 1009")


async def next_event(reader):
    """The next server-sent event as (name, JSON data); chunk sizes and comments skipped."""
    name = None
    while True:
        line = (await asyncio.wait_for(reader.readline(), 10)).decode().rstrip("\r\n")
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            return name, json.loads(line[len("data: "):])


async def event_stream(addr):
    """GET /v1/tracks/{t}/events: server-sent events, read as an EventSource would."""
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /v1/tracks/E/events?user=embed HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
    await writer.drain()
    status = (await reader.readline()).decode()
    expect(status.split()[1], "200", "event stream status")
    headers = {}
    while (line := (await reader.readline()).decode().strip()):
        key, _, value = line.partition(":")
        headers[key.lower()] = value.strip()
    expect(headers.get("content-type"), "text/event-stream", "event stream content type")
    expect(await next_event(reader), ("subscribed", {"type": "subscribed", "track": "E", "count": 0, "listeners": 1}),
           "event stream starts with the current count")
    async with websockets.connect(f"ws://{addr}/v1/ws?user=carol") as carol:
        await recv(carol)
        await carol.send(json.dumps({"type": "like", "track": "E", "id": "E1"}))
        expect((await recv(carol))["count"], 1, "like for the stream")
        name, update = await next_event(reader)
        expect((name, update["type"], update["count"], update["listeners"]), ("likes", "likes", 1, 1),
               "event stream update")
    writer.close()


def main():
    binary = sys.argv[1]
    with tempfile.TemporaryDirectory() as data:
        node = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--data-dir", data],
                                stdout=subprocess.PIPE, text=True)
        try:
            line = node.stdout.readline().strip()
            prefix = "fanfare listening on http://"
            if not line.startswith(prefix):
                raise SystemExit(f"unexpected first line from fanfare: {line!r}")
            asyncio.run(conversation("ws://" + line[len(prefix):]))
            asyncio.run(event_stream(line[len(prefix):]))
        finally:
            node.terminate()
            node.wait(timeout=15)
        print(f"protocol v1 conformance: passed (node exit code {node.returncode})")
        if node.returncode != 0:
            raise SystemExit("node did not exit cleanly on SIGTERM")


if __name__ == "__main__":
    main()
