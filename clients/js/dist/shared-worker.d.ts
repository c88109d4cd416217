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
import { PushClient } from "./index.js";
import type { PortLike, PushClientOptions } from "./index.js";
/** A tab that does not answer a token request within this long is taken for gone. Generous:
 * a background tab's event loop may be throttled, and the token callback may call a backend. */
export declare const TOKEN_ANSWER_MS = 20000;
/** The tabs of one shared worker and the one client they share. */
export declare class SharedConnectionHub {
    private readonly locks;
    /** Makes the client (tests pass their WebSocket stand-in). */
    private readonly makeClient;
    private readonly tokenAnswerMs;
    private readonly tabs;
    private client;
    /** The last `connected` event, for tabs that join while the connection is up. */
    private lastConnected;
    /** The resume point of a client that stopped when its last tab left. */
    private lastId;
    private readonly tokenRequests;
    private nextRid;
    constructor(locks?: LockManager | null, 
    /** Makes the client (tests pass their WebSocket stand-in). */
    makeClient?: (o: PushClientOptions) => PushClient, tokenAnswerMs?: number);
    /** The number of tabs joined. */
    get size(): number;
    /** The client holding the connection, while a tab is joined. */
    get shared(): PushClient | null;
    /** A new port (the worker's `connect` event): it joins once it says `hello`. */
    accept(port: PortLike): void;
    private send;
    private broadcast;
    private onTabMsg;
    private startClient;
    /** A token from the oldest tab; a tab that does not answer in time is dropped and the next one asked. */
    private token;
    private drop;
}
