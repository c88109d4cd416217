/**
 * The shared worker of `worker` sharing mode: one {@link PushClient} (one connection) for all the
 * tabs of an origin that join it, each over its `MessagePort`. Served as `dist/shared-worker.js`;
 * tabs start it with `new SharedWorker(url, { type: "module", name })` (see `shareMode`).
 *
 * - The first tab's options make the connection; tabs joining later use it as it is.
 * - Messages and events go to every tab; each tab drops repeats with its own resume point.
 * - Acks from any tab reach the connection (`autoAck: false`); with `autoAck` the worker acks.
 * - Tokens are asked of a tab (functions cannot cross a `MessagePort`): the oldest one first.
 * - A tab that goes away is noticed: `bye` from `stop()`; the release of the Web Lock the tab holds
 *   while it lives (closed, crashed, navigated away); or a token request it leaves unanswered.
 *   When no tab is left the connection closes; the next tab resumes from the last ID seen.
 */
import { PushClient, shareMessage } from "./index.js";
import type { PortLike, PushClientOptions, SharedOptions, TabToWorker, WorkerToTab } from "./index.js";

/** A tab that does not answer a token request within this long is taken for gone. Generous:
 * a background tab's event loop may be throttled, and the token callback may call a backend. */
export const TOKEN_ANSWER_MS = 20_000;

interface Pending {
  port: PortLike;
  resolve(token: string): void;
  reject(e: Error): void;
  timer: ReturnType<typeof setTimeout>;
}

/** The tabs of one shared worker and the one client they share. */
export class SharedConnectionHub {
  private readonly tabs = new Set<PortLike>();
  private client: PushClient | null = null;
  /** The last `connected` event, for tabs that join while the connection is up. */
  private lastConnected: unknown = null;
  /** The resume point of a client that stopped when its last tab left. */
  private lastId: number | null | undefined = undefined;
  private readonly tokenRequests = new Map<number, Pending>();
  private nextRid = 1;

  constructor(
    private readonly locks: LockManager | null = null,
    /** Makes the client (tests pass their WebSocket stand-in). */
    private readonly makeClient: (o: PushClientOptions) => PushClient = (o) => new PushClient(o),
    private readonly tokenAnswerMs = TOKEN_ANSWER_MS,
  ) {}

  /** The number of tabs joined. */
  get size(): number {
    return this.tabs.size;
  }

  /** The client holding the connection, while a tab is joined. */
  get shared(): PushClient | null {
    return this.client;
  }

  /** A new port (the worker's `connect` event): it joins once it says `hello`. */
  accept(port: PortLike): void {
    port.onmessage = (ev) => this.onTabMsg(port, ev.data as TabToWorker);
    port.start?.();
  }

  private send(port: PortLike, m: WorkerToTab): void {
    try {
      port.postMessage(m);
    } catch {
      // A closed port: the tab is gone.
      this.drop(port);
    }
  }

  private broadcast(m: WorkerToTab): void {
    for (const port of [...this.tabs]) this.send(port, m);
  }

  private onTabMsg(port: PortLike, m: TabToWorker): void {
    switch (m.kind) {
      case "hello":
        if (this.tabs.has(port)) return;
        this.tabs.add(port);
        if (m.lock && this.locks) {
          // Granted once the tab no longer holds it: the tab is gone.
          void this.locks.request(m.lock, () => this.drop(port));
        }
        this.send(port, { kind: "ready" });
        this.broadcast({ kind: "tabs", count: this.tabs.size });
        if (this.client === null) this.startClient(m.options);
        else if (this.lastConnected !== null) this.send(port, { kind: "event", type: "connected", payload: this.lastConnected });
        return;
      case "ack":
        if (this.tabs.has(port)) this.client?.ack(m.id);
        return;
      case "token": {
        const p = this.tokenRequests.get(m.rid);
        if (!p || p.port !== port) return;
        this.tokenRequests.delete(m.rid);
        clearTimeout(p.timer);
        if (typeof m.token === "string" && m.token !== "") p.resolve(m.token);
        else p.reject(new Error(m.error ?? "the tab returned no token"));
        return;
      }
      case "bye":
        this.drop(port);
        return;
    }
  }

  private startClient(options: SharedOptions): void {
    const client = this.makeClient({
      ...options,
      ...(this.lastId === undefined ? {} : { lastId: this.lastId }),
      token: () => this.token(),
      share: false,
    });
    this.client = client;
    client.on("connected", (payload) => {
      this.lastConnected = payload;
      this.broadcast({ kind: "event", type: "connected", payload });
    });
    client.on("disconnected", (payload) => {
      this.lastConnected = null;
      this.broadcast({ kind: "event", type: "disconnected", payload });
    });
    client.on("gap", (payload) => this.broadcast({ kind: "event", type: "gap", payload }));
    client.on("error", (payload) => this.broadcast({ kind: "event", type: "error", payload }));
    client.on("message", (m) => this.broadcast(shareMessage(m)));
    client.start();
  }

  /** A token from the oldest tab; a tab that does not answer in time is dropped and the next one asked. */
  private token(): Promise<string> {
    const port = this.tabs.values().next().value as PortLike | undefined;
    if (!port) return Promise.reject(new Error("no tab left to ask for a token"));
    const rid = this.nextRid++;
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.tokenRequests.delete(rid);
        this.drop(port);
        this.token().then(resolve, reject);
      }, this.tokenAnswerMs);
      this.tokenRequests.set(rid, { port, resolve, reject, timer });
      this.send(port, { kind: "token?", rid });
    });
  }

  private drop(port: PortLike): void {
    if (!this.tabs.delete(port)) return;
    try {
      port.close();
    } catch {
      // Already closed.
    }
    for (const [rid, p] of this.tokenRequests) {
      if (p.port !== port) continue;
      // Ask the next tab instead.
      this.tokenRequests.delete(rid);
      clearTimeout(p.timer);
      this.token().then(p.resolve, p.reject);
    }
    this.broadcast({ kind: "tabs", count: this.tabs.size });
    if (this.tabs.size === 0 && this.client) {
      // Nobody listens: close the connection; the next tab resumes where it ended.
      this.lastId = this.client.lastId;
      const c = this.client;
      this.client = null;
      this.lastConnected = null;
      c.stop();
    }
  }
}

// In a SharedWorkerGlobalScope: serve the tabs. (Imported elsewhere, e.g. by tests: nothing runs.)
const scope = globalThis as unknown as {
  onconnect?: ((ev: { ports: readonly PortLike[] }) => void) | null;
  navigator?: { locks?: LockManager };
};
if ("onconnect" in scope) {
  const hub = new SharedConnectionHub(scope.navigator?.locks ?? null);
  scope.onconnect = (ev) => {
    for (const port of ev.ports) hub.accept(port);
  };
}
