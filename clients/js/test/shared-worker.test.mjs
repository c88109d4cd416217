// Unit tests of `worker` sharing mode without a browser: tabs (PushClient with shareMode
// "worker") and the shared worker's hub (SharedConnectionHub) talk over Node's real
// MessageChannel ports, as tabs and a SharedWorker do; the connection is a scripted WebSocket
// stand-in. The real SharedWorker in Chromium is in e2e/.
import { afterEach, test } from "node:test";
import assert from "node:assert/strict";
import { PushClient } from "../dist/index.js";
import { SharedConnectionHub } from "../dist/shared-worker.js";
import { FakeWs, until } from "./fake-ws.mjs";


/** A stand-in for the browser's SharedWorker: every tab gets a port to the same hub. */
function installWorker(hub, { fails = false } = {}) {
  const made = [];
  globalThis.SharedWorker = class {
    constructor(url, options) {
      made.push({ url: String(url), options });
      const { port1, port2 } = new MessageChannel();
      this.port = port1;
      this.onerror = null;
      if (fails) setTimeout(() => this.onerror?.({}), 1);
      else hub.accept(port2);
    }
  };
  return made;
}

const tabs = [];
function tab(opts = {}) {
  const events = [];
  const c = new PushClient({
    url: "http://a:1",
    token: "t0",
    share: true,
    shareMode: "worker",
    sharedWorkerUrl: "/dist/shared-worker.js",
    backoff: { baseMs: 1, capMs: 5 },
    ...opts,
  });
  for (const type of ["connected", "message", "disconnected", "error", "role"]) c.on(type, (ev) => events.push({ type, ev }));
  tabs.push(c);
  return { c, events, messages: () => events.filter((e) => e.type === "message").map((e) => e.ev.data) };
}

function hub(tokenAnswerMs) {
  FakeWs.all = [];
  return new SharedConnectionHub(null, (o) => new PushClient({ ...o, WebSocket: FakeWs }), tokenAnswerMs);
}

afterEach(() => {
  for (const c of tabs.splice(0)) c.stop();
  delete globalThis.SharedWorker;
});

test("worker mode: two tabs, one connection; both get messages and events; an ack from either tab reaches it", async () => {
  const h = hub();
  const made = installWorker(h);
  const a = tab({ autoAck: false, token: () => "from-tab-a" });
  const b = tab({ autoAck: false, token: "from-tab-b" });
  a.c.start();
  await until("the worker's connection", () => FakeWs.all.length === 1);
  b.c.start();
  await until("both tabs joined", () => h.size === 2);
  assert.deepEqual(made[0], { url: "/dist/shared-worker.js", options: { type: "module", name: "push-client:default" } });
  assert.equal(a.c.role, "shared");
  const ws = FakeWs.all[0];
  // The token was asked of the first tab: functions cannot cross a MessagePort.
  assert.deepEqual(ws.protocols, ["push.v1", "from-tab-a"]);
  assert.equal(ws.url, "ws://a:1/ws?since=0");
  ws.hello();
  await until("both tabs connected", () => a.c.connected && b.c.connected);
  ws.serverSends({ type: "message", id: 1, data: "one" });
  ws.serverSends({ type: "message", id: 2, mid: "m2", data: { n: 2 } });
  await until("both messages in both tabs", () => a.messages().length === 2 && b.messages().length === 2);
  assert.deepEqual(b.messages(), ["one", { n: 2 }]);
  assert.equal(b.events.find((e) => e.type === "message" && e.ev.id === 2).ev.mid, "m2");
  assert.deepEqual(ws.sent, [], "autoAck off: nothing acked yet");
  b.events.find((e) => e.type === "message" && e.ev.id === 2).ev.ack();
  a.c.ack(1);
  a.c.ack(2);
  await until("the acks on the connection", () => ws.sent.length === 2);
  // Two ports: their order is not defined; each id once (a's ack(2) repeats b's).
  await new Promise((r) => setTimeout(r, 20));
  assert.deepEqual(ws.sent.map((m) => m.id).sort(), [1, 2]);
  assert.ok(ws.sent.every((m) => m.type === "ack"));
  assert.equal(FakeWs.all.length, 1, "one connection for two tabs");
});

test("worker mode: a tab joining later sees the connection up; the last tab leaving closes it; the next resumes", async () => {
  const h = hub();
  installWorker(h);
  const a = tab();
  a.c.start();
  await until("connection", () => FakeWs.all.length === 1);
  const ws = FakeWs.all[0];
  ws.hello();
  ws.serverSends({ type: "message", id: 7, data: "seven" });
  await until("auto ack by the worker", () => ws.sent.length === 1);
  const b = tab();
  b.c.start();
  await until("the late tab connected", () => b.c.connected);
  await until("two tabs counted", () => a.c.tabs === 2 && b.c.tabs === 2);
  a.c.stop();
  await until("tab a gone", () => h.size === 1 && b.c.tabs === 1);
  assert.equal(a.c.tabs, null, "a stopped tab shares nothing");
  assert.equal(ws.closedByClient, null, "a tab is left: the connection stays");
  ws.serverSends({ type: "message", id: 8, data: "eight" });
  await until("b gets it", () => b.messages().includes("eight"));
  assert.ok(!a.messages().includes("eight"));
  b.c.stop();
  await until("no tab left: the connection closes", () => ws.closedByClient === 1000);
  assert.equal(h.shared, null);
  const c = tab({ lastId: 0 });
  c.c.start();
  await until("a new connection", () => FakeWs.all.length === 2);
  assert.equal(FakeWs.all[1].url, "ws://a:1/ws?since=8", "resumes from the last id the worker saw");
});

test("worker mode: a tab that leaves a token request unanswered is dropped; the next tab is asked", async () => {
  const h = hub(50);
  installWorker(h);
  // A tab that joins and then never answers (frozen, or gone without a lock to tell).
  const { port1: mute, port2 } = new MessageChannel();
  h.accept(port2);
  mute.onmessage = () => {};
  mute.postMessage({ kind: "hello", options: { url: "http://a:1", backoff: { baseMs: 1, capMs: 5 } }, lock: null });
  await until("the mute tab joined", () => h.size === 1);
  const b = tab({ token: "from-tab-b" });
  b.c.start();
  await until("a connection with b's token", () => FakeWs.all.length === 1);
  assert.deepEqual(FakeWs.all[0].protocols, ["push.v1", "from-tab-b"]);
  assert.equal(h.size, 1, "the mute tab was dropped");
  mute.close();
});

test("worker mode: the release of a tab's Web Lock drops it", async () => {
  // A minimal LockManager: exclusive locks, granted in request order.
  const held = new Map();
  const locks = {
    request(name, cb) {
      const run = () => {
        const done = Promise.resolve(cb({ name }));
        held.set(name, done);
        return done.finally(() => held.delete(name));
      };
      const prev = held.get(name);
      return prev ? prev.then(run) : run();
    },
  };
  FakeWs.all = [];
  const h = new SharedConnectionHub(locks, (o) => new PushClient({ ...o, WebSocket: FakeWs }));
  let release;
  await new Promise((granted) => locks.request("tab-1", () => (granted(), new Promise((r) => (release = r)))));
  const { port1, port2 } = new MessageChannel();
  h.accept(port2);
  port1.onmessage = (ev) => {
    if (ev.data.kind === "token?") port1.postMessage({ kind: "token", rid: ev.data.rid, token: "t" });
  };
  port1.postMessage({ kind: "hello", options: { url: "http://a:1" }, lock: "tab-1" });
  await until("joined and connecting", () => h.size === 1 && FakeWs.all.length === 1);
  release(); // the tab closes: the browser releases its lock
  await until("the tab dropped, the connection closed", () => h.size === 0 && FakeWs.all[0].closedByClient === 1000);
  port1.close();
});

test("auto mode falls back when the worker's script fails to load; worker mode reports it", async () => {
  FakeWs.all = [];
  installWorker(null, { fails: true });
  const a = tab({ shareMode: "auto", WebSocket: FakeWs });
  a.c.start();
  // Node has no Web Locks: the fallback is a connection of the tab's own.
  await until("the tab's own connection", () => FakeWs.all.length === 1);
  assert.equal(a.c.role, "solo");
  assert.match(a.events.find((e) => e.type === "error").ev.message, /failed to load; sharing with Web Locks instead/);
  const b = tab({ shareMode: "worker", WebSocket: FakeWs });
  b.c.start();
  await until("the error", () => b.events.some((e) => e.type === "error"));
  assert.equal(b.events.find((e) => e.type === "error").ev.code, "shared_worker");
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(FakeWs.all.length, 1, "forced worker mode does not fall back");
});

test("locks mode never starts a shared worker", async () => {
  FakeWs.all = [];
  const made = installWorker(hub());
  const a = tab({ shareMode: "locks", WebSocket: FakeWs });
  a.c.start();
  await until("own connection (Node has no Web Locks)", () => FakeWs.all.length === 1);
  assert.equal(made.length, 0);
});
