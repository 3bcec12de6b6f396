// Fanfare JS client: a dependency-free ES module for protocol v1 (docs/protocol.md).
// Served by every node at /client.js.
//
//   import { FanfareClient } from "/client.js";
//   const client = new FanfareClient("ws://127.0.0.1:8080/v1/ws", { user: "ana" });
//   client.addEventListener("likes", (e) => console.log(e.detail.track, e.detail.count));
//   client.addEventListener("state", (e) => console.log(e.detail.state));
//   client.connect();
//   const count = await client.subscribe("demo:track-1");
//   const ack = await client.like("demo:track-1");      // { count, duplicate, latencyMs }
//
// It pings at the interval the node announces, reconnects with exponential backoff and full
// jitter, resubscribes and takes the current counts on return, resends unacked likes with the
// same idempotency key (so nothing is counted twice), and honours the node's drain hint
// (close 1001: reconnect after a random delay, so a restart causes no herd). With tokens,
// pass `getToken` (async, returns a fresh JWT): the client sends it as a `refresh` before the
// session's `expires_at`, and uses a fresh one to reconnect after close 4001 `token expired`.

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;
const DRAIN_SPREAD_MS = 5000;

function newKey() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export class FanfareClient extends EventTarget {
  /**
   * @param {string} url WebSocket URL of /v1/ws (ws:// or wss://)
   * @param {{user?: string, token?: string, getToken?: () => Promise<string>}} options dev user
   *   id, or a token (sent as ?token=) and how to get a newer one
   */
  constructor(url, options = {}) {
    super();
    this.url = new URL(url);
    if (options.user) this.url.searchParams.set("user", options.user);
    if (options.token) this.url.searchParams.set("token", options.token);
    this.user = options.user ?? null;
    this.state = "idle";
    this.tracks = new Map(); // track -> last known count
    this.watching = new Set(); // tracks subscribed with { listeners: true }
    this.pending = new Map(); // key -> { frame, resolve, reject, sentAt }
    this.waitingSubscribe = new Map(); // track -> [resolve]
    this.attempt = 0;
    this.closedByUser = false;
    this.ws = null;
    this.heartbeat = null;
    this.lastHeard = 0;
    this.timer = null;
    this.getToken = options.getToken ?? null;
    this.refreshTimer = null;
  }

  connect() {
    this.closedByUser = false;
    this.#open();
    return this;
  }

  close() {
    this.closedByUser = true;
    clearTimeout(this.timer);
    clearTimeout(this.refreshTimer);
    this.#stopHeartbeat();
    this.ws?.close(1000, "client closing");
    this.#setState("closed");
  }

  /**
   * Subscribes (and stays subscribed across reconnects); resolves with the current count.
   * With `{ listeners: true }` the node also sends `listeners` frames (event "listeners") when
   * only the number of listeners changes, at most every 2 s.
   */
  subscribe(track, { listeners = false } = {}) {
    if (!this.tracks.has(track)) this.tracks.set(track, null);
    if (listeners) this.watching.add(track);
    else this.watching.delete(track);
    const counted = new Promise((resolve) => {
      const list = this.waitingSubscribe.get(track) ?? [];
      list.push(resolve);
      this.waitingSubscribe.set(track, list);
    });
    this.#send(this.#subscribeFrame(track));
    return counted;
  }

  #subscribeFrame(track) {
    return this.watching.has(track) ? { type: "subscribe", track, listeners: true } : { type: "subscribe", track };
  }

  unsubscribe(track) {
    this.tracks.delete(track);
    this.watching.delete(track);
    this.#send({ type: "unsubscribe", track });
  }

  /** Likes a track; resolves with the ack once the like is durable. Resent on reconnect. */
  like(track, key = newKey()) {
    return this.#request({ type: "like", track, id: key });
  }

  unlike(track, key = newKey()) {
    return this.#request({ type: "unlike", track, id: key });
  }

  /** Hands the node a newer token for this user (and uses it for later reconnects). */
  refresh(token) {
    this.url.searchParams.set("token", token);
    this.#send({ type: "refresh", token });
  }

  /** Refreshes well before the session's end: 80 % of the time left, at least 1 s from now. */
  #scheduleRefresh(expiresAt) {
    clearTimeout(this.refreshTimer);
    if (!expiresAt || !this.getToken) return;
    const left = expiresAt * 1000 - Date.now();
    this.refreshTimer = setTimeout(async () => {
      try {
        this.refresh(await this.getToken());
      } catch (err) {
        this.#emit("error", { code: "unauthorized", message: `getToken failed: ${err}` });
      }
    }, Math.max(1000, left * 0.8));
  }

  #request(frame) {
    return new Promise((resolve, reject) => {
      this.pending.set(frame.id, { frame, resolve, reject, sentAt: performance.now() });
      this.#send(frame);
    });
  }

  #send(frame) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
    // Otherwise it goes out on (re)connect: subscriptions and pending likes are replayed.
  }

  #setState(state, extra = {}) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, ...extra } }));
  }

  #open() {
    this.#setState(this.attempt === 0 ? "connecting" : "reconnecting");
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onmessage = (event) => this.#onFrame(event.data);
    ws.onclose = (event) => this.#onClose(event);
    ws.onerror = () => {}; // onclose follows and decides
  }

  #onFrame(text) {
    this.lastHeard = Date.now();
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    switch (frame.type) {
      case "welcome":
        this.user = frame.user;
        this.attempt = 0;
        this.#startHeartbeat(frame.heartbeat_ms);
        this.#scheduleRefresh(frame.expires_at);
        this.#setState("connected", { user: frame.user });
        // Resume: resubscribe everything, resend every unacked like with its original key.
        for (const track of this.tracks.keys()) this.ws.send(JSON.stringify(this.#subscribeFrame(track)));
        for (const { frame: pendingFrame } of this.pending.values()) this.ws.send(JSON.stringify(pendingFrame));
        break;
      case "subscribed":
        this.tracks.set(frame.track, frame.count);
        for (const resolve of this.waitingSubscribe.get(frame.track) ?? []) resolve(frame.count);
        this.waitingSubscribe.delete(frame.track);
        this.#emit("count", { track: frame.track, count: frame.count });
        this.#emit("listeners", { track: frame.track, listeners: frame.listeners });
        break;
      case "likes":
        if (this.tracks.has(frame.track)) this.tracks.set(frame.track, frame.count);
        this.#emit("likes", frame);
        this.#emit("count", { track: frame.track, count: frame.count });
        this.#emit("listeners", { track: frame.track, listeners: frame.listeners });
        break;
      case "listeners":
        this.#emit("listeners", { track: frame.track, listeners: frame.listeners });
        break;
      case "ack": {
        const waiting = this.pending.get(frame.id);
        this.pending.delete(frame.id);
        if (this.tracks.has(frame.track)) this.tracks.set(frame.track, frame.count);
        this.#emit("count", { track: frame.track, count: frame.count });
        waiting?.resolve({ ...frame, latencyMs: performance.now() - waiting.sentAt });
        break;
      }
      case "error": {
        const waiting = frame.id ? this.pending.get(frame.id) : null;
        // Overloaded and internal errors are retried with the same key on the next connect.
        if (waiting && !["overloaded", "internal"].includes(frame.code)) {
          this.pending.delete(frame.id);
          waiting.reject(Object.assign(new Error(frame.message), { code: frame.code, retryAfterMs: frame.retry_after_ms }));
        }
        this.#emit("error", frame);
        break;
      }
      case "refreshed":
        this.#scheduleRefresh(frame.expires_at);
        break;
      default:
        break; // pong and anything newer
    }
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #startHeartbeat(intervalMs) {
    this.#stopHeartbeat();
    this.lastHeard = Date.now();
    this.heartbeat = setInterval(() => {
      if (this.ws?.readyState !== WebSocket.OPEN) return;
      // Nothing heard for two intervals: the connection is dead even if the socket says open.
      if (Date.now() - this.lastHeard > 2 * intervalMs + 5000) {
        this.ws.close(4000, "heartbeat lost");
        return;
      }
      this.ws.send('{"type":"ping"}');
    }, intervalMs);
  }

  #stopHeartbeat() {
    clearInterval(this.heartbeat);
    this.heartbeat = null;
  }

  async #onClose(event) {
    this.#stopHeartbeat();
    clearTimeout(this.refreshTimer);
    if (this.closedByUser) return;
    if (event.code === 4001 && this.getToken) {
      // Token expired: come back with a fresh one (the old one would get HTTP 401).
      try {
        this.url.searchParams.set("token", await this.getToken());
      } catch {
        // Reconnect anyway; the backoff below keeps trying.
      }
    }
    let delay;
    if (event.code === 1001) {
      // Drain hint: the node is going away and says when to come back (spread per client).
      const hint = /reconnect_after_ms=(\d+)/.exec(event.reason ?? "");
      delay = hint ? Number(hint[1]) : Math.random() * DRAIN_SPREAD_MS;
    } else {
      const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt);
      delay = Math.random() * ceiling; // full jitter
    }
    this.attempt += 1;
    this.#setState("reconnecting", { retryInMs: Math.round(delay), code: event.code });
    this.timer = setTimeout(() => this.#open(), delay);
  }
}
