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
"closed"
/** The connection failed before or without a close frame (network, refusal, TLS...). */
 | "network"
/** The server refused the connection with an HTTP status (SSE; WebSocket refusals look like `network` in browsers). */
 | "refused"
/** Nothing arrived for `heartbeatFactor` heartbeat intervals. */
 | "heartbeat_timeout"
/** The server asked to reconnect (`rotate` or `drain`); the new connection is up. */
 | "rotate" | "drain"
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
    role: {
        role: Role;
    };
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
    onmessage: ((ev: {
        data: unknown;
    }) => void) | null;
    onclose: ((ev: {
        code: number;
        reason: string;
    }) => void) | null;
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
    backoff?: {
        baseMs?: number;
        capMs?: number;
    };
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
/** Full-jitter backoff: uniformly random in `[0, min(cap, base * 2^attempt))`. */
export declare function backoffDelay(attempt: number, baseMs: number, capMs: number, random: () => number): number;
/** The `exp` claim of a JWT in milliseconds since the epoch, or `null` (none, or not a JWT). */
export declare function tokenExpiry(token: string): number | null;
/**
 * The URL to open: `base` with the transport's path and `since`. A WebSocket URL gets the
 * `ws(s):` scheme; an SSE URL `http(s):`. The token never goes in the URL (logs keep URLs).
 */
export declare function connectUrl(base: string, transport: Transport, since: number | null): string;
/** The `POST /ack` URL on the client port for SSE acknowledgements. */
export declare function ackUrl(base: string, ids: number[]): string;
/** Tracks the resume point: the last ID seen; a message at or below it is a repeat. */
export declare class ResumePoint {
    last: number | null;
    constructor(last: number | null);
    /** True when `id` is new (and now the resume point); false for a repeat. */
    accept(id: number): boolean;
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
export declare class SseParser {
    private buf;
    private event;
    private data;
    private id;
    private traceparent;
    private sawField;
    /** Feeds decoded text; returns the complete events and the number of comment lines seen. */
    feed(text: string): {
        events: SseEvent[];
        comments: number;
    };
}
/** A server message of protocol v1, checked for the fields the client uses. */
export type ServerMessage = {
    type: "hello";
    conn_id?: number;
    node?: string;
    user?: string;
    device?: string | null;
    lifetime_ms?: number;
    heartbeat_ms?: number;
} | {
    type: "message";
    id: number;
    mid?: string;
    traceparent?: string;
    data: unknown;
} | {
    type: "reconnect";
    reason: string;
    grace_ms?: number;
} | {
    type: "gap";
    after: number;
    oldest: number | null;
} | {
    type: "error";
    code?: string;
    message?: string;
} | {
    type: "pong";
};
/** Parses one WebSocket text frame; throws with a clear message on anything else. */
export declare function parseServerMessage(text: string): ServerMessage;
/** Turns an SSE event into the server message it carries (`message` data is the payload as-is). */
export declare function sseToMessage(ev: SseEvent): ServerMessage | null;
type Listener<K extends keyof EventMap> = (ev: EventMap[K]) => void;
/** Messages between the tabs of one shared client (and from a shared worker to its tabs). */
type ShareMsg = {
    kind: "event";
    type: "connected" | "gap" | "disconnected" | "error";
    payload: unknown;
} | {
    kind: "message";
    id: number;
    mid?: string;
    traceparent?: string;
    data: unknown;
} | {
    kind: "ack";
    id: number;
};
/** A message as the tabs pass it on: optional fields only when set. */
export declare function shareMessage(m: Pick<PushMessage, "id" | "mid" | "traceparent" | "data">): Extract<ShareMsg, {
    kind: "message";
}>;
/** The options a tab hands the shared worker: {@link PushClientOptions} without functions. */
export type SharedOptions = Pick<PushClientOptions, "url" | "transport" | "autoAck" | "lastId" | "backoff" | "heartbeatFactor" | "tokenRefreshMarginMs" | "connectTimeoutMs">;
/** Tab → shared worker, over the worker's `MessagePort`. */
export type TabToWorker = 
/** Joins. `lock`: a Web Lock the tab holds while it lives (its release tells that the tab is gone). */
{
    kind: "hello";
    options: SharedOptions;
    lock: string | null;
} | {
    kind: "ack";
    id: number;
}
/** The answer to a `token?` request. */
 | {
    kind: "token";
    rid: number;
    token?: string;
    error?: string;
}
/** The tab stops (`stop()`). */
 | {
    kind: "bye";
};
/** Shared worker → tab. */
export type WorkerToTab = Exclude<ShareMsg, {
    kind: "ack";
}>
/** The tab has joined. */
 | {
    kind: "ready";
}
/** The number of tabs sharing the connection, sent to each when a tab joins or leaves. */
 | {
    kind: "tabs";
    count: number;
}
/** The connection needs a token: answered with `token` and the same `rid`. */
 | {
    kind: "token?";
    rid: number;
};
/** The part of `MessagePort` used here (also Node's `MessagePort`, in tests). */
export interface PortLike {
    onmessage: ((ev: {
        data: unknown;
    }) => void) | null;
    postMessage(m: unknown): void;
    start?(): void;
    close(): void;
}
/**
 * A push client: call {@link PushClient.start}, listen with {@link PushClient.on}.
 *
 * ```ts
 * const client = new PushClient({ url: "https://push.example.com", token: () => getToken() });
 * client.on("message", (m) => console.log(m.id, m.data));
 * client.start();
 * ```
 */
export declare class PushClient {
    private readonly opts;
    private readonly urls;
    private urlIndex;
    private readonly listeners;
    private readonly resume;
    private current;
    private pending;
    private attempt;
    private retryTimer;
    private running;
    private cachedToken;
    private tokenStale;
    private refreshTimer;
    private acked;
    private channel;
    private releaseLock;
    private _role;
    /** `worker` mode: the port to the shared worker, and whether it has answered yet. */
    private port;
    private workerReady;
    /** `worker` mode: the worker's connection is up (between its `connected` and `disconnected`). */
    private sharedUp;
    private sharedTabs;
    constructor(options: PushClientOptions);
    /** The last message ID seen: keep it (e.g. in storage) and pass it as `lastId` next time. */
    get lastId(): number | null;
    /** Whether this tab holds the connection (see `share`). */
    get role(): Role;
    /** `worker` mode: how many tabs share the worker's connection (this one included); else `null`. */
    get tabs(): number | null;
    /** True while a connection has said `hello` and not closed (in `shared` role: the worker's). */
    get connected(): boolean;
    on<K extends keyof EventMap>(type: K, fn: Listener<K>): () => void;
    private emit;
    /** Connects (or, with `share`, joins the tab holding the connection). */
    start(): void;
    private startLocksOrSolo;
    /** Closes the connection and stops reconnecting. */
    stop(): void;
    /** Acknowledges message `id` (for `autoAck: false`); each ID is acknowledged once. */
    ack(id: number): void;
    private token;
    /** Fetches the next token ahead of expiry, so a reconnect never waits for (or uses) a stale one. */
    private scheduleRefresh;
    private connect;
    private wsCtor;
    private fetchFn;
    private onServerMessage;
    private deliver;
    private startWatchdog;
    private dispose;
    private onConnClosed;
    private nextDelay;
    private scheduleRetry;
    private startShared;
    private post;
    /**
     * `worker` mode: joins the shared worker named `name`, which holds one connection for all the
     * tabs that join it. With `fallback` (`auto` mode), a worker script that fails to load before
     * answering (not served, blocked by a CSP) turns this tab to `locks` mode instead.
     */
    private startWorker;
    private workerFailed;
    private onWorkerMsg;
    private onShareMsg;
}
export {};
