/**
 * Client for push-server's client protocol, version 1 (docs/protocol.md), for browsers and Node.
 * No runtime dependencies.
 *
 * | part | role |
 * |---|---|
 * | pure helpers ({@link backoffDelay}, {@link tokenExpiry}, {@link connectUrl}, {@link SseParser}, {@link ResumePoint}) | no I/O, unit-tested in Node |
 * | transports (`openWs`, `openSse`) | one connection each: frames in, acks out, one `onClose` |
 * | {@link PushClient} | the policy: token, resume, `reconnect` new-connection-first, backoff, heartbeat watchdog, acks, events |
 * | cross-tab sharing, `worker` mode | a `SharedWorker` (`shared-worker.ts`, {@link SharedConnectionHub}) holds the one connection; tabs talk to it over a `MessagePort` |
 * | cross-tab sharing, `locks` mode | one tab (the Web Locks holder) connects; the others follow over a `BroadcastChannel` |
 */

/** `ws` (WebSocket, `/ws`) or `sse` (Server-Sent Events over `fetch`, `/sse`). */
export type Transport = "ws" | "sse";

/** A push as the application sees it. */
export interface PushMessage {
  /** Per-user increasing ID: the resume point. */
  id: number;
  /** The envelope's message ID when it came through the queue (push-lib). */
  mid?: string;
  /**
   * The W3C `traceparent` of a traced push (WebSocket field or SSE `traceparent:` field, live
   * or replayed on resume): report a receive span under it to continue the trace.
   */
  traceparent?: string;
  /** The payload: a string for text, or the JSON value. */
  data: unknown;
  /** Acknowledges this message (a delivery receipt); a no-op when it was already acknowledged. */
  ack(): void;
}

/** The history no longer covers the resume point: messages between `after` and `oldest` are lost. */
export interface GapEvent {
  after: number;
  /** `null` when the history could not be read at all: only live messages follow. */
  oldest: number | null;
}

export interface ConnectedEvent {
  transport: Transport;
  url: string;
  connId: number | null;
  node: string;
  user: string;
  device: string | null;
  lifetimeMs: number;
  heartbeatMs: number;
  /** The `since` the connection resumed from (`null`: live messages only). */
  since: number | null;
}

export type DisconnectReason =
  /** The server closed the connection (see `code`). */
  | "closed"
  /** The connection failed before or without a close frame (network, refusal, TLS...). */
  | "network"
  /** The server refused the connection with an HTTP status (SSE; WebSocket refusals look like `network` in browsers). */
  | "refused"
  /** Nothing arrived for `heartbeatFactor` heartbeat intervals. */
  | "heartbeat_timeout"
  /** The server asked to reconnect (`rotate` or `drain`); the new connection is up. */
  | "rotate"
  | "drain"
  /** `stop()` was called. */
  | "stopped";

export interface DisconnectedEvent {
  reason: DisconnectReason;
  /** WebSocket close code (4003 reconnect ignored, 4008 slow consumer, 4009 heartbeat, 1001 shutdown...). */
  code?: number;
  /** HTTP status of a refusal (SSE). */
  status?: number;
  /** True when the client will connect again by itself. */
  willReconnect: boolean;
  /** Delay before the next attempt, when one is scheduled now. */
  retryInMs?: number;
}

export interface ClientErrorEvent {
  /** `bad_message` etc. from the server, or `token` / `transport` / `protocol` from the client. */
  code: string;
  message: string;
}

export interface EventMap {
  connected: ConnectedEvent;
  message: PushMessage;
  gap: GapEvent;
  disconnected: DisconnectedEvent;
  error: ClientErrorEvent;
  /** Cross-tab sharing: this tab became the one holding the connection, or follows it. */
  role: { role: Role };
}

/**
 * `solo`: own connection; `leader`: own connection shared with other tabs; `follower`: uses the
 * leader's; `shared`: uses the connection a `SharedWorker` holds for all tabs.
 */
export type Role = "solo" | "leader" | "follower" | "shared";

/**
 * How tabs share one connection (with `share`): `worker`, a `SharedWorker` holds it; `locks`, the
 * tab holding a Web Lock does and the others follow over a `BroadcastChannel`; `auto` (default),
 * `worker` where `SharedWorker` exists (falling back to `locks` if its script fails to load),
 * else `locks`.
 */
export type ShareMode = "auto" | "worker" | "locks";

type WebSocketLike = {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
};
type WebSocketCtor = new (url: string, protocols?: string | string[]) => WebSocketLike;
type FetchLike = typeof fetch;

export interface PushClientOptions {
  /**
   * The client port of one node or several (`https://push.example.com`, `ws://127.0.0.1:8080`). Failed
   * attempts and `drain` move on to the next one.
   */
  url: string | string[];
  /** The token, or a callback that returns one (called again before the cached one expires). */
  token: string | (() => string | Promise<string>);
  /** Default `ws`. */
  transport?: Transport;
  /** Acknowledge each message after the `message` listeners ran. Default true. */
  autoAck?: boolean;
  /**
   * The last ID this client saw, e.g. kept in storage: the first connection resumes after it.
   * Default 0: every message the server still keeps (as a new device). `null`: live messages only.
   */
  lastId?: number | null;
  /** Backoff with full jitter: attempt n waits `random() * min(capMs, baseMs * 2^n)`. Defaults 500 and 30000. */
  backoff?: { baseMs?: number; capMs?: number };
  /** A connection that hears nothing for this many heartbeat intervals is taken for dead. Default 3. */
  heartbeatFactor?: number;
  /** Fetch a new token this long before the cached one's `exp`. Default 60 s. */
  tokenRefreshMarginMs?: number;
  /** A connection whose `hello` has not arrived after this long is given up. Default 15 s. */
  connectTimeoutMs?: number;
  /**
   * Share one connection among the tabs of this origin (Web Locks + BroadcastChannel): `true`, or
   * a name to keep several clients apart. Where either API is missing, each tab connects itself.
   */
  share?: boolean | string;
  /** Default `auto`: see {@link ShareMode}. */
  shareMode?: ShareMode;
  /**
   * The script of the shared worker (`worker` mode): `dist/shared-worker.js` of this package,
   * served from the page's origin. Default: `shared-worker.js` next to this module
   * (`new URL("./shared-worker.js", import.meta.url)`), right when `dist/` is served as it is.
   * Bundlers: `new URL("@push-platform/client/shared-worker.js", import.meta.url)` where they
   * resolve package specifiers in that form, or the address where the file is served.
   */
  sharedWorkerUrl?: string | URL;
  /** Implementations to use instead of the globals (Node without a WebSocket global, tests). */
  WebSocket?: WebSocketCtor;
  fetch?: FetchLike;
  random?: () => number;
}

// ---------------------------------------------------------------------------------------------
// Pure helpers
// ---------------------------------------------------------------------------------------------

/** Full-jitter backoff: uniformly random in `[0, min(cap, base * 2^attempt))`. */
export function backoffDelay(attempt: number, baseMs: number, capMs: number, random: () => number): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/** The `exp` claim of a JWT in milliseconds since the epoch, or `null` (none, or not a JWT). */
export function tokenExpiry(token: string): number | null {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1]!.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "=".repeat((4 - (b64.length % 4)) % 4);
    const claims: unknown = JSON.parse(atob(padded));
    if (claims && typeof claims === "object" && typeof (claims as { exp?: unknown }).exp === "number") {
      return (claims as { exp: number }).exp * 1000;
    }
  } catch {
    // Not our business to validate: the server does; without `exp` we never refresh early.
  }
  return null;
}

/**
 * The URL to open: `base` with the transport's path and `since`. A WebSocket URL gets the
 * `ws(s):` scheme; an SSE URL `http(s):`. The token never goes in the URL (logs keep URLs).
 */
export function connectUrl(base: string, transport: Transport, since: number | null): string {
  const u = new URL(base);
  const secure = u.protocol === "https:" || u.protocol === "wss:";
  if (transport === "ws") u.protocol = secure ? "wss:" : "ws:";
  else u.protocol = secure ? "https:" : "http:";
  u.pathname = u.pathname.replace(/\/+$/, "") + (transport === "ws" ? "/ws" : "/sse");
  if (since !== null) u.searchParams.set("since", String(since));
  return u.toString();
}

/** The `POST /ack` URL on the client port for SSE acknowledgements. */
export function ackUrl(base: string, ids: number[]): string {
  const u = new URL(base);
  if (u.protocol === "wss:") u.protocol = "https:";
  if (u.protocol === "ws:") u.protocol = "http:";
  u.pathname = u.pathname.replace(/\/+$/, "") + "/ack";
  u.search = "";
  u.searchParams.set("id", ids.join(","));
  return u.toString().replace(/%2C/g, ",");
}

/** Tracks the resume point: the last ID seen; a message at or below it is a repeat. */
export class ResumePoint {
  constructor(public last: number | null) {}
  /** True when `id` is new (and now the resume point); false for a repeat. */
  accept(id: number): boolean {
    if (this.last !== null && id <= this.last) return false;
    this.last = id;
    return true;
  }
}

/** One event of an SSE stream. */
export interface SseEvent {
  event: string;
  data: string;
  id: string | null;
  /** The `traceparent:` field, present only when the event had one. */
  traceparent?: string;
}

/**
 * Incremental `text/event-stream` parser (the WHATWG rules used here: fields, multi-line `data`,
 * comments, CR/LF/CRLF line ends). Comments are reported so heartbeats are visible.
 */
export class SseParser {
  private buf = "";
  private event = "";
  private data: string[] = [];
  private id: string | null = null;
  private traceparent: string | null = null;
  private sawField = false;

  /** Feeds decoded text; returns the complete events and the number of comment lines seen. */
  feed(text: string): { events: SseEvent[]; comments: number } {
    this.buf += text;
    const events: SseEvent[] = [];
    let comments = 0;
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buf);
      if (!m) break;
      // A lone CR at the end may be the first half of CRLF: wait for the next chunk.
      if (m[0] === "\r" && m.index === this.buf.length - 1) break;
      const line = this.buf.slice(0, m.index);
      this.buf = this.buf.slice(m.index + m[0].length);
      if (line === "") {
        if (this.sawField && this.data.length > 0) {
          const ev: SseEvent = { event: this.event || "message", data: this.data.join("\n"), id: this.id };
          if (this.traceparent !== null) ev.traceparent = this.traceparent;
          events.push(ev);
        }
        this.event = "";
        this.data = [];
        this.id = null;
        this.traceparent = null;
        this.sawField = false;
        continue;
      }
      if (line.startsWith(":")) {
        comments++;
        continue;
      }
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      this.sawField = true;
      if (field === "event") this.event = value;
      else if (field === "data") this.data.push(value);
      else if (field === "id") this.id = value;
      else if (field === "traceparent") this.traceparent = value;
    }
    return { events, comments };
  }
}

/** A server message of protocol v1, checked for the fields the client uses. */
export type ServerMessage =
  | {
      type: "hello";
      conn_id?: number;
      node?: string;
      user?: string;
      device?: string | null;
      lifetime_ms?: number;
      heartbeat_ms?: number;
    }
  | { type: "message"; id: number; mid?: string; traceparent?: string; data: unknown }
  | { type: "reconnect"; reason: string; grace_ms?: number }
  | { type: "gap"; after: number; oldest: number | null }
  | { type: "error"; code?: string; message?: string }
  | { type: "pong" };

/** Parses one WebSocket text frame; throws with a clear message on anything else. */
export function parseServerMessage(text: string): ServerMessage {
  const v: unknown = JSON.parse(text);
  if (!v || typeof v !== "object" || typeof (v as { type?: unknown }).type !== "string") {
    throw new Error("server message without a `type`");
  }
  const m = v as { type: string; id?: unknown };
  if (m.type === "message" && typeof m.id !== "number") throw new Error("`message` without a numeric `id`");
  return v as ServerMessage;
}

/** Turns an SSE event into the server message it carries (`message` data is the payload as-is). */
export function sseToMessage(ev: SseEvent): ServerMessage | null {
  if (ev.event === "message") {
    const id = Number(ev.id);
    if (ev.id === null || !Number.isSafeInteger(id)) throw new Error("SSE `message` without a numeric `id:`");
    return ev.traceparent === undefined
      ? { type: "message", id, data: ev.data }
      : { type: "message", id, traceparent: ev.traceparent, data: ev.data };
  }
  return parseServerMessage(ev.data);
}

// ---------------------------------------------------------------------------------------------
// Transports: one connection each
// ---------------------------------------------------------------------------------------------

interface CloseInfo {
  reason: "closed" | "network" | "refused";
  code?: number;
  status?: number;
  detail?: string;
}

interface ConnHandlers {
  onMessage(m: ServerMessage): void;
  /** Anything arrived (frame, heartbeat comment): the peer is alive. */
  onActivity(): void;
  onProtocolError(e: Error): void;
  /** Called once, unless `close()` was called first. */
  onClose(info: CloseInfo): void;
}

interface Conn {
  readonly transport: Transport;
  ack(ids: number[]): void;
  /** Application-level ping (WebSocket); browsers do not expose WebSocket ping frames. */
  ping(): void;
  /** Closes from our side; `onClose` is not called afterwards. */
  close(): void;
}

function openWs(Ws: WebSocketCtor, url: string, token: string, h: ConnHandlers): Conn {
  // Browsers cannot set headers on a WebSocket: the token travels as a subprotocol entry.
  const ws = new Ws(url, ["push.v1", token]);
  let done = false;
  const finish = (info: CloseInfo) => {
    if (done) return;
    done = true;
    h.onClose(info);
  };
  ws.onmessage = (ev) => {
    if (done) return;
    h.onActivity();
    if (typeof ev.data !== "string") return;
    let msg: ServerMessage;
    try {
      msg = parseServerMessage(ev.data);
    } catch (e) {
      h.onProtocolError(e as Error);
      return;
    }
    h.onMessage(msg);
  };
  ws.onclose = (ev) => finish(ev.code === 1006 ? { reason: "network", code: ev.code } : { reason: "closed", code: ev.code });
  ws.onerror = () => {
    // The close event follows with the details.
  };
  const send = (obj: unknown) => {
    if (ws.readyState === 1) ws.send(JSON.stringify(obj));
  };
  return {
    transport: "ws",
    ack(ids) {
      for (const id of ids) send({ type: "ack", id });
    },
    ping() {
      send({ type: "ping" });
    },
    close() {
      done = true;
      try {
        ws.close(1000);
      } catch {
        // Already closed.
      }
    },
  };
}

function openSse(
  f: FetchLike,
  base: string,
  url: string,
  since: number | null,
  token: string,
  h: ConnHandlers,
): Conn {
  const abort = new AbortController();
  let done = false;
  const finish = (info: CloseInfo) => {
    if (done) return;
    done = true;
    abort.abort();
    h.onClose(info);
  };
  void (async () => {
    let res: Response;
    try {
      res = await f(url, {
        // `Last-Event-ID` as EventSource would send it (the server prefers it to `?since=`).
        headers: {
          Authorization: `Bearer ${token}`,
          Accept: "text/event-stream",
          ...(since === null ? {} : { "Last-Event-ID": String(since) }),
        },
        cache: "no-store",
        signal: abort.signal,
      });
    } catch (e) {
      finish({ reason: "network", detail: String(e) });
      return;
    }
    if (!res.ok || !res.body) {
      let detail = "";
      try {
        detail = await res.text();
      } catch {
        // The status says enough.
      }
      finish({ reason: "refused", status: res.status, detail });
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser();
    try {
      for (;;) {
        const { value, done: end } = await reader.read();
        if (end) break;
        if (done) return;
        h.onActivity();
        const { events } = parser.feed(decoder.decode(value, { stream: true }));
        for (const ev of events) {
          if (done) return;
          let msg: ServerMessage | null;
          try {
            msg = sseToMessage(ev);
          } catch (e) {
            h.onProtocolError(e as Error);
            continue;
          }
          if (msg) h.onMessage(msg);
        }
      }
      finish({ reason: "closed" });
    } catch (e) {
      finish({ reason: "network", detail: String(e) });
    }
  })();
  // Acks are batched: one POST per tick, at most 100 IDs each (the server's limit).
  let queued: number[] = [];
  const flush = () => {
    const ids = queued;
    queued = [];
    for (let i = 0; i < ids.length; i += 100) {
      f(ackUrl(base, ids.slice(i, i + 100)), {
        method: "POST",
        headers: { Authorization: `Bearer ${token}` },
      }).then(
        (r) => {
          if (!r.ok) h.onProtocolError(new Error(`POST /ack answered ${r.status}`));
        },
        (e: unknown) => h.onProtocolError(new Error(`POST /ack failed: ${String(e)}`)),
      );
    }
  };
  return {
    transport: "sse",
    ack(ids) {
      if (queued.length === 0) setTimeout(flush, 0);
      queued.push(...ids);
    },
    ping() {
      // SSE heartbeats are comment lines the server sends by itself.
    },
    close() {
      done = true;
      abort.abort();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

type Listener<K extends keyof EventMap> = (ev: EventMap[K]) => void;

interface Attempt {
  conn: Conn;
  url: string;
  since: number | null;
  helloAt: number | null;
  heartbeatMs: number;
  lastActivity: number;
  timer: ReturnType<typeof setInterval> | null;
  connectTimer: ReturnType<typeof setTimeout> | null;
}

/** Messages between the tabs of one shared client (and from a shared worker to its tabs). */
type ShareMsg =
  | { kind: "event"; type: "connected" | "gap" | "disconnected" | "error"; payload: unknown }
  | { kind: "message"; id: number; mid?: string; traceparent?: string; data: unknown }
  | { kind: "ack"; id: number };

/** A message as the tabs pass it on: optional fields only when set. */
export function shareMessage(
  m: Pick<PushMessage, "id" | "mid" | "traceparent" | "data">,
): Extract<ShareMsg, { kind: "message" }> {
  const out: Extract<ShareMsg, { kind: "message" }> = { kind: "message", id: m.id, data: m.data };
  if (m.mid !== undefined) out.mid = m.mid;
  if (m.traceparent !== undefined) out.traceparent = m.traceparent;
  return out;
}

/** The options a tab hands the shared worker: {@link PushClientOptions} without functions. */
export type SharedOptions = Pick<
  PushClientOptions,
  "url" | "transport" | "autoAck" | "lastId" | "backoff" | "heartbeatFactor" | "tokenRefreshMarginMs" | "connectTimeoutMs"
>;

/** Tab → shared worker, over the worker's `MessagePort`. */
export type TabToWorker =
  /** Joins. `lock`: a Web Lock the tab holds while it lives (its release tells that the tab is gone). */
  | { kind: "hello"; options: SharedOptions; lock: string | null }
  | { kind: "ack"; id: number }
  /** The answer to a `token?` request. */
  | { kind: "token"; rid: number; token?: string; error?: string }
  /** The tab stops (`stop()`). */
  | { kind: "bye" };

/** Shared worker → tab. */
export type WorkerToTab =
  | Exclude<ShareMsg, { kind: "ack" }>
  /** The tab has joined. */
  | { kind: "ready" }
  /** The number of tabs sharing the connection, sent to each when a tab joins or leaves. */
  | { kind: "tabs"; count: number }
  /** The connection needs a token: answered with `token` and the same `rid`. */
  | { kind: "token?"; rid: number };

/** The part of `MessagePort` used here (also Node's `MessagePort`, in tests). */
export interface PortLike {
  onmessage: ((ev: { data: unknown }) => void) | null;
  postMessage(m: unknown): void;
  start?(): void;
  close(): void;
}
type SharedWorkerCtor = new (url: string | URL, options?: { type?: "module"; name?: string }) => {
  readonly port: PortLike;
  onerror: ((ev: unknown) => void) | null;
};

const DEFAULT_HEARTBEAT_MS = 30_000;

/**
 * A push client: call {@link PushClient.start}, listen with {@link PushClient.on}.
 *
 * ```ts
 * const client = new PushClient({ url: "https://push.example.com", token: () => getToken() });
 * client.on("message", (m) => console.log(m.id, m.data));
 * client.start();
 * ```
 */
export class PushClient {
  private readonly opts: Required<
    Pick<PushClientOptions, "transport" | "autoAck" | "heartbeatFactor" | "tokenRefreshMarginMs" | "connectTimeoutMs">
  > &
    PushClientOptions;
  private readonly urls: string[];
  private urlIndex = 0;
  private readonly listeners = new Map<keyof EventMap, Set<Listener<keyof EventMap>>>();
  private readonly resume: ResumePoint;
  private current: Attempt | null = null;
  private pending: Attempt | null = null;
  private attempt = 0;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private running = false;
  private cachedToken: { token: string; exp: number | null } | null = null;
  private tokenStale = false;
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private acked = new Set<number>();
  private channel: BroadcastChannel | null = null;
  private releaseLock: (() => void) | null = null;
  private _role: Role = "solo";
  /** `worker` mode: the port to the shared worker, and whether it has answered yet. */
  private port: PortLike | null = null;
  private workerReady = false;
  /** `worker` mode: the worker's connection is up (between its `connected` and `disconnected`). */
  private sharedUp = false;
  private sharedTabs: number | null = null;

  constructor(options: PushClientOptions) {
    this.opts = {
      transport: "ws",
      autoAck: true,
      heartbeatFactor: 3,
      tokenRefreshMarginMs: 60_000,
      connectTimeoutMs: 15_000,
      ...options,
    };
    this.urls = Array.isArray(options.url) ? [...options.url] : [options.url];
    if (this.urls.length === 0) throw new Error("PushClient: `url` needs at least one address");
    for (const u of this.urls) new URL(u); // throws a clear TypeError on a bad URL now, not later
    this.resume = new ResumePoint(options.lastId === undefined ? 0 : options.lastId);
  }

  /** The last message ID seen: keep it (e.g. in storage) and pass it as `lastId` next time. */
  get lastId(): number | null {
    return this.resume.last;
  }

  /** Whether this tab holds the connection (see `share`). */
  get role(): Role {
    return this._role;
  }

  /** `worker` mode: how many tabs share the worker's connection (this one included); else `null`. */
  get tabs(): number | null {
    return this._role === "shared" ? this.sharedTabs : null;
  }

  /** True while a connection has said `hello` and not closed (in `shared` role: the worker's). */
  get connected(): boolean {
    if (this._role === "shared") return this.sharedUp;
    return this.current !== null && this.current.helloAt !== null;
  }

  on<K extends keyof EventMap>(type: K, fn: Listener<K>): () => void {
    let set = this.listeners.get(type);
    if (!set) {
      set = new Set();
      this.listeners.set(type, set);
    }
    set.add(fn as Listener<keyof EventMap>);
    return () => set.delete(fn as Listener<keyof EventMap>);
  }

  private emit<K extends keyof EventMap>(type: K, ev: EventMap[K]): void {
    if (this._role === "leader" && (type === "connected" || type === "gap" || type === "disconnected" || type === "error")) {
      this.post({ kind: "event", type: type as "connected", payload: ev });
    }
    for (const fn of this.listeners.get(type) ?? []) {
      try {
        (fn as Listener<K>)(ev);
      } catch (e) {
        // A listener's bug must not break the connection; report it (unless it is an error listener).
        if (type !== "error") this.emit("error", { code: "listener", message: String(e) });
      }
    }
  }

  /** Connects (or, with `share`, joins the tab holding the connection). */
  start(): void {
    if (this.running) return;
    this.running = true;
    const name = this.opts.share === true ? "default" : this.opts.share || null;
    const mode = this.opts.shareMode ?? "auto";
    const g = globalThis as { SharedWorker?: SharedWorkerCtor };
    if (name && mode !== "locks" && g.SharedWorker) {
      this.startWorker(`push-client:${name}`, g.SharedWorker, mode === "auto");
    } else {
      this.startLocksOrSolo(name);
    }
  }

  private startLocksOrSolo(name: string | null): void {
    const g = globalThis as { BroadcastChannel?: typeof BroadcastChannel; navigator?: Navigator };
    if (name && this.opts.shareMode !== "worker" && g.BroadcastChannel && g.navigator?.locks) {
      this.startShared(`push-client:${name}`, g.navigator.locks);
    } else {
      this.connect();
    }
  }

  /** Closes the connection and stops reconnecting. */
  stop(): void {
    if (!this.running) return;
    this.running = false;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.retryTimer = this.refreshTimer = null;
    for (const a of [this.current, this.pending]) if (a) this.dispose(a);
    const wasConnected = this.current?.helloAt != null;
    this.current = this.pending = null;
    this.channel?.close();
    this.channel = null;
    if (this.port) {
      this.post({ kind: "bye" });
      this.port.close();
      this.port = null;
    }
    const sharedWasUp = this._role === "shared" && this.sharedUp;
    this.sharedUp = false;
    this.sharedTabs = null;
    this.releaseLock?.();
    this.releaseLock = null;
    if (wasConnected || sharedWasUp) this.emit("disconnected", { reason: "stopped", willReconnect: false });
  }

  /** Acknowledges message `id` (for `autoAck: false`); each ID is acknowledged once. */
  ack(id: number): void {
    if (this.acked.has(id)) return;
    this.acked.add(id);
    // Remember a bounded number of acknowledged IDs: enough to make repeated ack() calls no-ops.
    if (this.acked.size > 1000) this.acked.delete(this.acked.values().next().value as number);
    if (this._role === "follower" || this._role === "shared") {
      this.post({ kind: "ack", id });
      return;
    }
    (this.current ?? this.pending)?.conn.ack([id]);
  }

  // --- token -------------------------------------------------------------------------------

  private async token(): Promise<string> {
    const now = Date.now();
    const c = this.cachedToken;
    if (c && !this.tokenStale && (c.exp === null || c.exp - this.opts.tokenRefreshMarginMs > now)) return c.token;
    const t = this.opts.token;
    const token = typeof t === "function" ? await t() : t;
    if (typeof token !== "string" || token === "") throw new Error("the token callback returned no token");
    this.cachedToken = { token, exp: tokenExpiry(token) };
    this.tokenStale = false;
    this.scheduleRefresh();
    return token;
  }

  /** Fetches the next token ahead of expiry, so a reconnect never waits for (or uses) a stale one. */
  private scheduleRefresh(): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    const exp = this.cachedToken?.exp;
    if (exp == null || typeof this.opts.token !== "function") return;
    // Capped: setTimeout overflows past 2^31 ms.
    const inMs = Math.min(Math.max(exp - this.opts.tokenRefreshMarginMs - Date.now(), 1000), 2 ** 31 - 1);
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      if (!this.running) return;
      this.tokenStale = true;
      this.token().catch((e: unknown) => this.emit("error", { code: "token", message: String(e) }));
    }, inMs);
  }

  // --- connections -------------------------------------------------------------------------

  private connect(): void {
    if (!this.running) return;
    const base = this.urls[this.urlIndex % this.urls.length]!;
    const since = this.resume.last;
    const url = connectUrl(base, this.opts.transport, since);
    this.token().then(
      (token) => {
        if (!this.running) return;
        const a: Attempt = {
          conn: null as unknown as Conn,
          url,
          since,
          helloAt: null,
          heartbeatMs: DEFAULT_HEARTBEAT_MS,
          lastActivity: Date.now(),
          timer: null,
          connectTimer: null,
        };
        const handlers: ConnHandlers = {
          onMessage: (m) => this.onServerMessage(a, m),
          onActivity: () => {
            a.lastActivity = Date.now();
          },
          onProtocolError: (e) => this.emit("error", { code: "protocol", message: e.message }),
          onClose: (info) => this.onConnClosed(a, info),
        };
        try {
          a.conn =
            this.opts.transport === "ws"
              ? openWs(this.wsCtor(), url, token, handlers)
              : openSse(this.fetchFn(), base, url, since, token, handlers);
        } catch (e) {
          this.emit("error", { code: "transport", message: String(e) });
          this.scheduleRetry({ reason: "network" });
          return;
        }
        a.connectTimer = setTimeout(() => {
          if (a.helloAt === null) {
            this.dispose(a);
            this.onConnClosed(a, { reason: "network", detail: "no hello in time" }, true);
          }
        }, this.opts.connectTimeoutMs);
        if (this.current === null) this.current = a;
        else this.pending = a;
      },
      (e: unknown) => {
        this.emit("error", { code: "token", message: String(e) });
        this.scheduleRetry({ reason: "network" });
      },
    );
  }

  private wsCtor(): WebSocketCtor {
    const ws = this.opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
    if (!ws) throw new Error("no WebSocket implementation: pass `WebSocket` in the options");
    return ws;
  }

  private fetchFn(): FetchLike {
    const f = this.opts.fetch ?? globalThis.fetch;
    if (!f) throw new Error("no fetch implementation: pass `fetch` in the options");
    return f.bind(globalThis);
  }

  private onServerMessage(a: Attempt, m: ServerMessage): void {
    switch (m.type) {
      case "hello": {
        if (a.connectTimer) clearTimeout(a.connectTimer);
        a.connectTimer = null;
        a.helloAt = Date.now();
        a.heartbeatMs = m.heartbeat_ms && m.heartbeat_ms > 0 ? m.heartbeat_ms : DEFAULT_HEARTBEAT_MS;
        this.startWatchdog(a);
        this.attempt = 0;
        if (this.pending === a && this.current) {
          // New connection first: the old one is closed only now that this one is up.
          const old = this.current;
          this.dispose(old);
          this.current = a;
          this.pending = null;
        }
        this.emit("connected", {
          transport: this.opts.transport,
          url: a.url,
          connId: m.conn_id ?? null,
          node: m.node ?? "",
          user: m.user ?? "",
          device: m.device ?? null,
          lifetimeMs: m.lifetime_ms ?? 0,
          heartbeatMs: a.heartbeatMs,
          since: a.since,
        });
        return;
      }
      case "message":
        this.deliver(m.id, m.mid, m.traceparent, m.data);
        return;
      case "gap":
        this.emit("gap", { after: m.after, oldest: m.oldest });
        return;
      case "reconnect":
        if (a !== this.current || this.pending) return;
        // A draining node refuses new connections: go straight to the next address.
        if (m.reason === "drain") this.urlIndex++;
        this.connect();
        return;
      case "error":
        this.emit("error", { code: m.code ?? "server", message: m.message ?? "" });
        return;
      case "pong":
        return;
      default:
        return;
    }
  }

  private deliver(id: number, mid: string | undefined, traceparent: string | undefined, data: unknown): void {
    if (!this.resume.accept(id)) return;
    let acked = false;
    const msg: PushMessage = {
      id,
      data,
      ack: () => {
        if (acked) return;
        acked = true;
        this.ack(id);
      },
    };
    if (mid !== undefined) msg.mid = mid;
    if (traceparent !== undefined) msg.traceparent = traceparent;
    if (this._role === "leader") this.post(shareMessage(msg));
    this.emit("message", msg);
    if (this.opts.autoAck) msg.ack();
  }

  private startWatchdog(a: Attempt): void {
    if (a.timer) clearInterval(a.timer);
    const tick = Math.max(Math.floor(a.heartbeatMs / 4), 50);
    a.timer = setInterval(() => {
      const idle = Date.now() - a.lastActivity;
      if (idle > a.heartbeatMs * this.opts.heartbeatFactor) {
        this.dispose(a);
        this.onConnClosed(a, { reason: "network" }, true);
        return;
      }
      // Browsers answer WebSocket pings but do not show them to scripts: ask for a pong that
      // they do show, once per quiet interval.
      if (idle > a.heartbeatMs) a.conn.ping();
    }, tick);
  }

  private dispose(a: Attempt): void {
    if (a.timer) clearInterval(a.timer);
    if (a.connectTimer) clearTimeout(a.connectTimer);
    a.timer = a.connectTimer = null;
    a.conn?.close();
  }

  private onConnClosed(a: Attempt, info: CloseInfo, heartbeat = false): void {
    this.dispose(a);
    if (!this.running) return;
    const beforeHello = a.helloAt === null;
    // A refusal before hello may be an expired or revoked token: fetch a new one next time.
    if (beforeHello) this.tokenStale = true;
    if (this.pending === a) {
      this.pending = null;
      // The old connection still works: try the new one again later while it lasts.
      this.urlIndex++;
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null;
        if (this.current && !this.pending) this.connect();
      }, this.nextDelay());
      return;
    }
    if (this.current !== a) return;
    this.current = null;
    if (beforeHello) this.urlIndex++;
    const reason: DisconnectReason = heartbeat && !beforeHello ? "heartbeat_timeout" : info.reason;
    this.scheduleRetry({ reason, code: info.code, status: info.status }, !beforeHello);
  }

  private nextDelay(): number {
    const base = this.opts.backoff?.baseMs ?? 500;
    const cap = this.opts.backoff?.capMs ?? 30_000;
    return backoffDelay(this.attempt++, base, cap, this.opts.random ?? Math.random);
  }

  private scheduleRetry(ev: Omit<DisconnectedEvent, "willReconnect" | "retryInMs">, wasConnected = false): void {
    if (!this.running) return;
    if (this.pending) {
      // A replacement is already on its way: it becomes current when its hello arrives.
      this.current = this.pending;
      this.pending = null;
      if (wasConnected) this.emit("disconnected", { ...clean(ev), willReconnect: true, retryInMs: 0 });
      return;
    }
    const delay = this.nextDelay();
    this.emit("disconnected", { ...clean(ev), willReconnect: true, retryInMs: delay });
    if (this.retryTimer) clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.connect();
    }, delay);
  }

  // --- cross-tab sharing ---------------------------------------------------------------------

  private startShared(name: string, locks: LockManager): void {
    const channel = new BroadcastChannel(name);
    this.channel = channel;
    this._role = "follower";
    this.emit("role", { role: "follower" });
    channel.onmessage = (ev: MessageEvent<ShareMsg>) => this.onShareMsg(ev.data);
    // The tab holding the lock connects; when it closes (or stops), the browser releases the
    // lock and the next waiting tab takes over, resuming from the last ID it heard.
    void locks.request(name, () => {
      if (!this.running) return undefined;
      this._role = "leader";
      this.emit("role", { role: "leader" });
      this.connect();
      return new Promise<void>((resolve) => {
        this.releaseLock = resolve;
      });
    });
  }

  private post(m: ShareMsg | TabToWorker): void {
    try {
      if (this.port) this.port.postMessage(m);
      else this.channel?.postMessage(m);
    } catch {
      // A closed channel or port: nothing to share with.
    }
  }

  /**
   * `worker` mode: joins the shared worker named `name`, which holds one connection for all the
   * tabs that join it. With `fallback` (`auto` mode), a worker script that fails to load before
   * answering (not served, blocked by a CSP) turns this tab to `locks` mode instead.
   */
  private startWorker(name: string, Worker: SharedWorkerCtor, fallback: boolean): void {
    let worker: InstanceType<SharedWorkerCtor>;
    try {
      const url = this.opts.sharedWorkerUrl ?? new URL("./shared-worker.js", import.meta.url);
      worker = new Worker(url, { type: "module", name });
    } catch (e) {
      this.workerFailed(String(e), fallback, name);
      return;
    }
    worker.onerror = () => {
      if (this.port === worker.port && !this.workerReady) this.workerFailed("the shared worker's script failed to load", fallback, name);
    };
    const port = worker.port;
    this.port = port;
    this.workerReady = false;
    this._role = "shared";
    this.emit("role", { role: "shared" });
    port.onmessage = (ev) => this.onWorkerMsg(ev.data as WorkerToTab);
    port.start?.();
    const o = this.opts;
    const options: SharedOptions = clean({
      url: o.url,
      transport: o.transport,
      autoAck: o.autoAck,
      lastId: this.resume.last,
      backoff: o.backoff,
      heartbeatFactor: o.heartbeatFactor,
      tokenRefreshMarginMs: o.tokenRefreshMarginMs,
      connectTimeoutMs: o.connectTimeoutMs,
    });
    const locks = (globalThis as { navigator?: Navigator }).navigator?.locks;
    if (!locks) {
      // Without Web Locks the worker learns of a closed tab only from `bye` (stop()) or a token
      // request it leaves unanswered.
      this.post({ kind: "hello", options, lock: null });
      return;
    }
    // A lock held for as long as this tab lives: the worker asks for it too, and the browser
    // grants it to the worker when this tab goes away (closed, crashed, navigated).
    const lock = `${name}:tab:${Math.random().toString(36).slice(2)}${Date.now().toString(36)}`;
    void locks.request(lock, () => {
      if (!this.running || this.port !== port) return undefined;
      this.post({ kind: "hello", options, lock });
      return new Promise<void>((resolve) => {
        this.releaseLock = resolve;
      });
    });
  }

  private workerFailed(message: string, fallback: boolean, name: string): void {
    this.port?.close();
    this.port = null;
    this.releaseLock?.();
    this.releaseLock = null;
    this.emit("error", { code: "shared_worker", message: fallback ? `${message}; sharing with Web Locks instead` : message });
    if (!this.running) return;
    this._role = "solo";
    if (fallback) this.startLocksOrSolo(name.slice("push-client:".length));
  }

  private onWorkerMsg(m: WorkerToTab): void {
    switch (m.kind) {
      case "ready":
        this.workerReady = true;
        return;
      case "tabs":
        this.sharedTabs = m.count;
        return;
      case "token?":
        this.token().then(
          (token) => this.post({ kind: "token", rid: m.rid, token }),
          (e: unknown) => this.post({ kind: "token", rid: m.rid, error: String(e) }),
        );
        return;
      case "event":
        if (m.type === "connected") this.sharedUp = true;
        if (m.type === "disconnected") this.sharedUp = false;
        break;
    }
    this.onShareMsg(m);
  }

  private onShareMsg(m: ShareMsg): void {
    if (m.kind === "ack") {
      if (this._role === "leader") this.ack(m.id);
      return;
    }
    if (this._role !== "follower" && this._role !== "shared") return;
    if (m.kind === "message") {
      // The leader (or the worker) acknowledges (autoAck); a follower's ack() goes to it.
      if (!this.resume.accept(m.id)) return;
      let acked = false;
      const msg: PushMessage = {
        id: m.id,
        data: m.data,
        ack: () => {
          if (acked) return;
          acked = true;
          this.ack(m.id);
        },
      };
      if (m.mid !== undefined) msg.mid = m.mid;
      if (m.traceparent !== undefined) msg.traceparent = m.traceparent;
      this.emit("message", msg);
      return;
    }
    this.emit(m.type, m.payload as never);
  }
}

function clean<T extends object>(o: T): T {
  const out = {} as T;
  for (const [k, v] of Object.entries(o)) if (v !== undefined) (out as Record<string, unknown>)[k] = v;
  return out;
}
