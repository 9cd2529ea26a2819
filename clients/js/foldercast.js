// foldercast client: live folder updates over WebSocket or SSE, resumed after every gap.
//
//   import { connect } from "./foldercast.js";
//   const fc = connect({ url: "wss://host/ws", getToken: async () => token });
//   fc.on("event", (message, position) => …);   // every change, exactly once, in order
//   fc.on("resync", ({ space_id }) => …);        // history lost: refetch what you show
//   fc.on("notification", (n, ack) => …);       // operator notices; ack() those that ask
//   fc.watch("s-eng", "/f1/f2");
//   applyFolders(message, sizes);                // folder sizes on screen, deltas and absolutes
//
// The client keeps the last position it received and resumes from it on every reconnect
// (WebSocket `since` in the auth frame; SSE `?since=`, then the browser's Last-Event-ID). When
// the server says it cannot recover (`resumed` with `recovered:false`), it emits `resync` for
// every watched space (or once with `space_id: null` when nothing is watched), so the app
// refetches instead of showing stale sizes. Notifications that ask for an acknowledgement come
// on every connect of this device (`device` option) until `ack()` is called; each is emitted
// once per page. No build step; no dependencies.

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 20000;
const PING_EVERY_MS = 25000;
const PONG_WITHIN_MS = 10000;
/** How often a named device tells the server the position it has (so it resumes there later). */
const ACK_EVERY_MS = 5000;
/** Refusals that retrying cannot fix (a new token would be needed, and getToken gave this one). */
const TERMINAL = new Set(["invalid-token", "invalid-ticket", "unauthenticated", "user-mismatch"]);

/** Full jitter: a random delay up to min(max, min * 2^attempt) (centrifuge-js, AWS). */
export function backoff(attempt, min = BACKOFF_MIN_MS, max = BACKOFF_MAX_MS) {
  const cap = Math.min(max, min * 2 ** Math.min(attempt, 16));
  return Math.round(min / 2 + Math.random() * (cap - min / 2));
}

/**
 * Applies a message's folder changes to `sizes` (a Map from folder path to bytes) as the
 * contract says: entries in order; a run's `size_delta` is added to each folder it covers
 * (`path` and the `levels - 1` folders above it), an entry's absolute `size` (sent where the
 * change was not known exactly) replaces the folder's size. Only folders already in `sizes`
 * change (those the app shows). Works for single, coalesced and digest messages alike.
 * @returns {string[]} the paths that changed, in the order they changed
 */
export function applyFolders(message, sizes) {
  const changed = [];
  for (const entry of (message && message.folders) || []) {
    let path = entry.path;
    for (let n = 0; n < (entry.levels || 1) && path; n++) {
      if (sizes.has(path)) {
        const size = typeof entry.size === "number" ? entry.size : sizes.get(path) + entry.size_delta;
        sizes.set(path, size);
        changed.push(path);
      }
      path = path === "/" ? null : (path.lastIndexOf("/") === 0 ? "/" : path.slice(0, path.lastIndexOf("/")));
    }
  }
  return changed;
}

/**
 * Connects and keeps connected until close().
 * @param {import("./foldercast").Options} options
 * @returns {import("./foldercast").Connection}
 */
export function connect(options) {
  const opts = Object.assign({ transport: "ws", storageKey: null }, options);
  if (!opts.url && !opts.discoveryUrl) throw new Error("foldercast: url or discoveryUrl is required");
  // With discovery, every (re)connect asks which gateway to use; `url` is the fallback.
  const fallbackUrl = opts.url || null;
  if (!opts.getToken && !opts.ticketUrl) throw new Error("foldercast: getToken or ticketUrl is required");
  const handlers = { event: [], resync: [], resumed: [], state: [], error: [], notification: [] };
  const notified = new Set(); // notification ids emitted on this page (bounded below)
  const watches = new Map(); // "space\u0000path" -> {space_id, path}
  const storage = opts.storageKey && typeof localStorage !== "undefined" ? localStorage : null;
  let position = storage ? storage.getItem(opts.storageKey) : null;
  let state = "connecting";
  let attempt = 0;
  let closed = false;
  let socket = null; // WebSocket or EventSource
  let timer = null;
  let pingTimer = null;
  let pongTimer = null;
  let ackTimer = null;
  let acked = null; // the position last acknowledged to the server

  const emit = (name, ...args) => {
    for (const h of handlers[name]) {
      try { h(...args); } catch (e) { setTimeout(() => { throw e; }); }
    }
  };
  const setState = (next, detail) => {
    if (state === next) return;
    state = next;
    emit("state", next, detail);
  };
  const remember = (p) => {
    if (!p) return;
    position = p;
    if (storage) storage.setItem(opts.storageKey, p);
  };
  const resyncAll = (reason) => {
    if (watches.size === 0) emit("resync", { space_id: null, reason });
    const spaces = new Set([...watches.values()].map((w) => w.space_id));
    for (const space_id of spaces) emit("resync", { space_id, reason });
  };
  const clearTimers = () => {
    clearTimeout(timer);
    clearTimeout(pingTimer);
    clearTimeout(pongTimer);
    clearInterval(ackTimer);
    timer = pingTimer = pongTimer = ackTimer = null;
  };
  const scheduleReconnect = (delay) => {
    clearTimers();
    if (closed) return;
    if (typeof navigator !== "undefined" && navigator.onLine === false) {
      setState("offline");
      return; // the `online` event reconnects
    }
    setState("reconnecting", { in_ms: delay });
    timer = setTimeout(open, delay);
  };
  const dropSocket = () => {
    const s = socket;
    socket = null;
    if (!s) return;
    s.onopen = s.onmessage = s.onerror = s.onclose = null;
    try { s.close(); } catch (_) { /* already closed */ }
  };
  const fail = (delay) => {
    dropSocket();
    scheduleReconnect(delay ?? backoff(attempt++));
  };

  async function credentials() {
    // EventSource cannot send a bearer header: over SSE a token is exchanged for a single-use
    // ticket (POST /api/tickets next to the stream, unless ticketUrl says otherwise).
    const ticketUrl = opts.ticketUrl || (opts.transport === "sse" ? new URL("/api/tickets", opts.url).href : null);
    if (opts.getToken && !(opts.transport === "sse")) return { token: await opts.getToken() };
    const headers = opts.getToken ? { authorization: `Bearer ${await opts.getToken()}` } : {};
    const r = await fetch(ticketUrl, { method: "POST", credentials: "include", headers });
    if (!r.ok) throw Object.assign(new Error(`ticket request failed: ${r.status}`), { status: r.status });
    return { ticket: (await r.json()).ticket };
  }

  /** Emits a notification once per page, with its ack(). */
  function notify(n) {
    if (!n || !n.notification_id || notified.has(n.notification_id)) return;
    notified.add(n.notification_id);
    if (notified.size > 1000) notified.delete(notified.values().next().value);
    emit("notification", n, () => acknowledge(n));
  }

  async function acknowledge(n) {
    if (!n.ack) return;
    if (opts.transport !== "sse" && socket && socket.readyState === 1 && socket.send) {
      socket.send(JSON.stringify({ type: "ack", notification_id: n.notification_id }));
      return;
    }
    const url = new URL(`/api/notifications/${encodeURIComponent(n.notification_id)}/ack`, opts.url.replace(/^ws/, "http"));
    if (opts.device) url.searchParams.set("device", opts.device);
    const headers = opts.getToken ? { authorization: `Bearer ${await opts.getToken()}` } : {};
    const r = await fetch(url, { method: "POST", credentials: "include", headers });
    if (!r.ok) throw Object.assign(new Error(`ack failed: ${r.status}`), { status: r.status });
  }

  function onServerMessage(msg, sseId) {
    switch (msg.type) {
      case "notification":
        notify(msg.data);
        return;
      case "ready":
        // Where this connection starts; a client that had no position takes it.
        if (!position) remember(msg.position);
        setState("connected");
        return;
      case "resumed":
        attempt = 0; // reset only after a successful (re)start
        emit("resumed", msg);
        remember(msg.position);
        if (!msg.recovered) resyncAll(msg.reason);
        return;
      case "event":
      case "resync":
        attempt = 0;
        remember(msg.id ?? sseId);
        if (msg.type === "resync" || msg.data?.type === "resync") {
          emit("resync", { space_id: msg.space_id ?? msg.data?.space_id, reason: msg.data?.reason ?? "backlog" });
        }
        emit("event", msg.data, msg.id ?? sseId);
        if (msg.data?.type === "notification") notify(msg.data);
        return;
      case "pong":
        clearTimeout(pongTimer);
        return;
      case "reconnect":
        remember(msg.position);
        fail(msg.after_ms);
        return;
      case "error":
        emit("error", msg);
        if (msg.position) remember(msg.position);
        if (msg.code === "token-expired" && opts.getToken) {
          Promise.resolve(opts.getToken()).then((token) => {
            if (socket && socket.readyState === 1 && typeof socket.send === "function") {
              socket.send(JSON.stringify({ type: "auth", token }));
            }
          }, () => fail());
        } else if (TERMINAL.has(msg.code)) {
          closed = true;
          dropSocket();
          clearTimers();
          setState("closed", msg);
        }
        return;
      default:
        return;
    }
  }

  function armPing(ws) {
    clearTimeout(pingTimer);
    pingTimer = setTimeout(() => {
      if (socket !== ws) return;
      ws.send(JSON.stringify({ type: "ping" }));
      // No pong in time: the connection is dead even if the browser has not noticed.
      pongTimer = setTimeout(() => socket === ws && fail(), PONG_WITHIN_MS);
      armPing(ws);
    }, PING_EVERY_MS);
  }

  /** Asks `discoveryUrl` (GET /api/endpoint) for the least-loaded gateway; falls back to `url`. */
  async function discover() {
    if (!opts.discoveryUrl) return;
    try {
      const headers = opts.getToken ? { authorization: `Bearer ${await opts.getToken()}` } : {};
      const r = await fetch(opts.discoveryUrl, { credentials: "include", headers });
      if (r.ok) {
        const endpoint = await r.json();
        const next = opts.transport === "sse" ? endpoint.sse : endpoint.websocket;
        if (next) {
          opts.url = next;
          return;
        }
      }
    } catch (_) {
      // Discovery down: the fallback, or a retry with backoff.
    }
    if (!fallbackUrl) throw new Error("foldercast: discovery named no gateway");
    opts.url = fallbackUrl;
  }

  async function open() {
    clearTimers();
    if (closed) return;
    setState(attempt === 0 ? "connecting" : "reconnecting");
    let creds;
    try {
      await discover();
      creds = await credentials();
    } catch (e) {
      if (e && (e.status === 401 || e.status === 403)) {
        closed = true;
        setState("closed", { code: "unauthenticated", message: String(e.message || e) });
        return;
      }
      return fail();
    }
    if (closed) return;
    if (opts.transport === "sse") openSse(creds);
    else openWs(creds);
  }

  function openWs(creds) {
    const url = new URL(opts.url);
    if (creds.ticket) url.searchParams.set("ticket", creds.ticket);
    if (opts.device) url.searchParams.set("device", opts.device);
    if (opts.digest) url.searchParams.set("digest", String(opts.digest));
    const ws = new WebSocket(url);
    socket = ws;
    ws.onopen = () => {
      if (creds.token) ws.send(JSON.stringify(Object.assign({ type: "auth", token: creds.token }, position ? { since: position } : {})));
      else if (position) ws.send(JSON.stringify({ type: "resume", since: position }));
      for (const w of watches.values()) ws.send(JSON.stringify(Object.assign({ type: "watch" }, w)));
      armPing(ws);
      if (opts.device) {
        // Cumulative: the server keeps the device's latest, and resumes it there when it
        // connects without a position (a restarted app).
        clearInterval(ackTimer);
        ackTimer = setInterval(() => {
          if (socket !== ws || !position || position === acked) return;
          ws.send(JSON.stringify({ type: "ack", position }));
          acked = position;
        }, ACK_EVERY_MS);
      }
    };
    ws.onmessage = (e) => {
      let msg;
      try { msg = JSON.parse(e.data); } catch (_) { return; }
      onServerMessage(msg);
    };
    ws.onclose = (e) => {
      if (socket !== ws) return;
      const code = String(e.reason || "").split(":")[0];
      if (e.code === 1008 && TERMINAL.has(code)) {
        closed = true;
        socket = null;
        clearTimers();
        setState("closed", { code, message: e.reason });
        return;
      }
      fail();
    };
    ws.onerror = () => { /* onclose follows */ };
  }

  function openSse(creds) {
    const url = new URL(opts.url);
    if (creds.ticket) url.searchParams.set("ticket", creds.ticket);
    if (position) url.searchParams.set("since", position);
    if (opts.device) url.searchParams.set("device", opts.device);
    if (opts.digest) url.searchParams.set("digest", String(opts.digest));
    for (const w of watches.values()) url.searchParams.append("watch", `${w.space_id}:${w.path}`);
    const es = new EventSource(url);
    socket = es;
    const onData = (type) => (e) => {
      let data;
      try { data = JSON.parse(e.data); } catch (_) { return; }
      if (type === "ready" || type === "resumed" || type === "reconnect" || type === "error") onServerMessage(data);
      // An owed notification has no id line; a live one moves the position like any message.
      else if (type === "notification") {
        if (e.lastEventId && e.lastEventId !== position) onServerMessage({ type: "event", id: e.lastEventId, data }, e.lastEventId);
        else notify(data);
      }
      else onServerMessage({ type: type === "resync" ? "resync" : "event", id: e.lastEventId, data }, e.lastEventId);
    };
    for (const t of ["ready", "resumed", "reconnect", "error"]) es.addEventListener(t, onData(t));
    es.onmessage = onData("message");
    const types = ["file-uploaded", "file-touched", "folder-created", "item-trashed", "item-restored", "item-moved",
      "space-member-added", "space-member-removed", "coalesced", "resync", "notification"];
    for (const t of types) es.addEventListener(t, onData(t));
    // The browser reconnects by itself (sending Last-Event-ID); a closed stream is ours to retry.
    es.onerror = () => { if (es.readyState === 2 && socket === es) fail(); };
  }

  if (typeof window !== "undefined" && window.addEventListener) {
    window.addEventListener("online", () => { if (!closed && !socket) open(); });
    window.addEventListener("offline", () => { if (!closed) { dropSocket(); clearTimers(); setState("offline"); } });
  }
  open();

  return {
    on(name, handler) {
      if (!handlers[name]) throw new Error(`foldercast: unknown event ${name}`);
      handlers[name].push(handler);
      return () => { handlers[name] = handlers[name].filter((h) => h !== handler); };
    },
    watch(space_id, path = "/") {
      const w = { space_id, path };
      watches.set(`${space_id}\u0000${path}`, w);
      if (socket && socket.readyState === 1 && socket.send) socket.send(JSON.stringify(Object.assign({ type: "watch" }, w)));
      else if (socket && opts.transport === "sse") { dropSocket(); open(); }
    },
    unwatch(space_id, path) {
      for (const [k, w] of watches) {
        if ((space_id === undefined || w.space_id === space_id) && (path === undefined || w.path === path)) watches.delete(k);
      }
      if (socket && socket.readyState === 1 && socket.send) {
        socket.send(JSON.stringify(Object.assign({ type: "unwatch" }, space_id !== undefined ? { space_id } : {}, path !== undefined ? { path } : {})));
      }
    },
    close() {
      closed = true;
      clearTimers();
      dropSocket();
      setState("closed");
    },
    get position() { return position; },
    get state() { return state; },
  };
}

export default { connect, backoff, applyFolders };
