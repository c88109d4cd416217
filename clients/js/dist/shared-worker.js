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
/** A tab that does not answer a token request within this long is taken for gone. Generous:
 * a background tab's event loop may be throttled, and the token callback may call a backend. */
export const TOKEN_ANSWER_MS = 20000;
/** The tabs of one shared worker and the one client they share. */
export class SharedConnectionHub {
    constructor(locks = null, 
    /** Makes the client (tests pass their WebSocket stand-in). */
    makeClient = (o) => new PushClient(o), tokenAnswerMs = TOKEN_ANSWER_MS) {
        this.locks = locks;
        this.makeClient = makeClient;
        this.tokenAnswerMs = tokenAnswerMs;
        this.tabs = new Set();
        this.client = null;
        /** The last `connected` event, for tabs that join while the connection is up. */
        this.lastConnected = null;
        /** The resume point of a client that stopped when its last tab left. */
        this.lastId = undefined;
        this.tokenRequests = new Map();
        this.nextRid = 1;
    }
    /** The number of tabs joined. */
    get size() {
        return this.tabs.size;
    }
    /** The client holding the connection, while a tab is joined. */
    get shared() {
        return this.client;
    }
    /** A new port (the worker's `connect` event): it joins once it says `hello`. */
    accept(port) {
        port.onmessage = (ev) => this.onTabMsg(port, ev.data);
        port.start?.();
    }
    send(port, m) {
        try {
            port.postMessage(m);
        }
        catch {
            // A closed port: the tab is gone.
            this.drop(port);
        }
    }
    broadcast(m) {
        for (const port of [...this.tabs])
            this.send(port, m);
    }
    onTabMsg(port, m) {
        switch (m.kind) {
            case "hello":
                if (this.tabs.has(port))
                    return;
                this.tabs.add(port);
                if (m.lock && this.locks) {
                    // Granted once the tab no longer holds it: the tab is gone.
                    void this.locks.request(m.lock, () => this.drop(port));
                }
                this.send(port, { kind: "ready" });
                this.broadcast({ kind: "tabs", count: this.tabs.size });
                if (this.client === null)
                    this.startClient(m.options);
                else if (this.lastConnected !== null)
                    this.send(port, { kind: "event", type: "connected", payload: this.lastConnected });
                return;
            case "ack":
                if (this.tabs.has(port))
                    this.client?.ack(m.id);
                return;
            case "token": {
                const p = this.tokenRequests.get(m.rid);
                if (!p || p.port !== port)
                    return;
                this.tokenRequests.delete(m.rid);
                clearTimeout(p.timer);
                if (typeof m.token === "string" && m.token !== "")
                    p.resolve(m.token);
                else
                    p.reject(new Error(m.error ?? "the tab returned no token"));
                return;
            }
            case "bye":
                this.drop(port);
                return;
        }
    }
    startClient(options) {
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
    token() {
        const port = this.tabs.values().next().value;
        if (!port)
            return Promise.reject(new Error("no tab left to ask for a token"));
        const rid = this.nextRid++;
        return new Promise((resolve, reject) => {
            const timer = setTimeout(() => {
                this.tokenRequests.delete(rid);
                this.drop(port);
                this.token().then(resolve, reject);
            }, this.tokenAnswerMs);
            this.tokenRequests.set(rid, { port, resolve, reject, timer });
            this.send(port, { kind: "token?", rid });
        });
    }
    drop(port) {
        if (!this.tabs.delete(port))
            return;
        try {
            port.close();
        }
        catch {
            // Already closed.
        }
        for (const [rid, p] of this.tokenRequests) {
            if (p.port !== port)
                continue;
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
const scope = globalThis;
if ("onconnect" in scope) {
    const hub = new SharedConnectionHub(scope.navigator?.locks ?? null);
    scope.onconnect = (ev) => {
        for (const port of ev.ports)
            hub.accept(port);
    };
}
