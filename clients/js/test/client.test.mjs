// Unit tests of the client without a browser or a server: the pure helpers, and the
// connection policy driven through a scripted WebSocket stand-in (the real server and a real
// browser are in e2e/).
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  PushClient,
  ResumePoint,
  SseParser,
  ackUrl,
  backoffDelay,
  connectUrl,
  parseServerMessage,
  sseToMessage,
  tokenExpiry,
} from "../dist/index.js";
import { FakeWs, until } from "./fake-ws.mjs";

test("backoff is full jitter below an exponential ceiling, capped", () => {
  assert.equal(backoffDelay(0, 500, 30_000, () => 0), 0);
  assert.equal(backoffDelay(0, 500, 30_000, () => 0.999999), 499);
  assert.equal(backoffDelay(3, 500, 30_000, () => 0.5), 2000);
  // 500 * 2^10 is past the cap: the cap bounds it.
  assert.equal(backoffDelay(10, 500, 30_000, () => 0.5), 15_000);
  // Huge attempt counts neither overflow nor exceed the cap.
  assert.ok(backoffDelay(10_000, 500, 30_000, () => 0.999) < 30_000);
});

function jwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.c2ln`;
}

test("token expiry is read from the exp claim, null when absent or not a JWT", () => {
  assert.equal(tokenExpiry(jwt({ sub: "u", exp: 1_700_000_000 })), 1_700_000_000_000);
  assert.equal(tokenExpiry(jwt({ sub: "u" })), null);
  assert.equal(tokenExpiry("not-a-jwt"), null);
  assert.equal(tokenExpiry("a.!!!.c"), null);
});

test("connect and ack URLs: scheme per transport, path, since; no token in the URL", () => {
  assert.equal(connectUrl("http://h:8080", "ws", null), "ws://h:8080/ws");
  assert.equal(connectUrl("https://h/push/", "ws", 0), "wss://h/push/ws?since=0");
  assert.equal(connectUrl("wss://h", "sse", 17), "https://h/sse?since=17");
  assert.equal(ackUrl("ws://h:1", [1, 2, 3]), "http://h:1/ack?id=1,2,3");
});

test("SSE parser: multi-line data, ids, comments, CRLF split over chunks", () => {
  const p = new SseParser();
  let r = p.feed(": hb\n\nid: 5\nevent: message\ndata: a\r");
  assert.equal(r.comments, 1);
  assert.deepEqual(r.events, []);
  r = p.feed("\ndata: b\r\n\r\nevent: gap\ndata: {\"type\":\"gap\",\"after\":1,\"oldest\":3}\n\n");
  assert.deepEqual(r.events, [
    { event: "message", data: "a\nb", id: "5" },
    { event: "gap", data: '{"type":"gap","after":1,"oldest":3}', id: null },
  ]);
  assert.deepEqual(sseToMessage(r.events[0]), { type: "message", id: 5, data: "a\nb" });
  assert.deepEqual(sseToMessage(r.events[1]), { type: "gap", after: 1, oldest: 3 });
  assert.throws(() => sseToMessage({ event: "message", data: "x", id: null }), /numeric `id:`/);
  // A traced message's `traceparent:` field, for that event only.
  const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  r = p.feed(`id: 6\nevent: message\ntraceparent: ${tp}\ndata: t\n\nid: 7\nevent: message\ndata: u\n\n`);
  assert.deepEqual(r.events, [
    { event: "message", data: "t", id: "6", traceparent: tp },
    { event: "message", data: "u", id: "7" },
  ]);
  assert.deepEqual(sseToMessage(r.events[0]), { type: "message", id: 6, traceparent: tp, data: "t" });
  assert.deepEqual(sseToMessage(r.events[1]), { type: "message", id: 7, data: "u" });
});

test("server messages are checked for what the client relies on", () => {
  assert.throws(() => parseServerMessage("[]"), /without a `type`/);
  assert.throws(() => parseServerMessage('{"type":"message","id":"7"}'), /numeric `id`/);
  assert.throws(() => parseServerMessage("{"), SyntaxError);
});

test("resume point drops repeats and keeps the highest id", () => {
  const r = new ResumePoint(0);
  assert.ok(r.accept(10));
  assert.ok(!r.accept(10));
  assert.ok(!r.accept(9));
  assert.ok(r.accept(12));
  assert.equal(r.last, 12);
  const live = new ResumePoint(null);
  assert.ok(live.accept(1));
});

// --- the policy, through a scripted WebSocket --------------------------------------------

function client(opts = {}) {
  FakeWs.all = [];
  const events = [];
  const c = new PushClient({
    url: ["http://a:1", "http://b:2"],
    token: "t0",
    WebSocket: FakeWs,
    backoff: { baseMs: 1, capMs: 5 },
    ...opts,
  });
  for (const type of ["connected", "message", "gap", "disconnected", "error"]) {
    c.on(type, (ev) => events.push({ type, ev }));
  }
  return { c, events };
}

test("token as a subprotocol, hello, messages deduplicated in order and acked", async () => {
  const { c, events } = client();
  c.start();
  await until("first socket", () => FakeWs.all.length === 1);
  const ws = FakeWs.all[0];
  assert.equal(ws.url, "ws://a:1/ws?since=0");
  assert.deepEqual(ws.protocols, ["push.v1", "t0"]);
  ws.hello();
  assert.ok(c.connected);
  ws.serverSends({ type: "message", id: 5, data: "a" });
  ws.serverSends({ type: "message", id: 5, data: "a again" });
  const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  ws.serverSends({ type: "message", id: 6, mid: "m6", traceparent: tp, data: { n: 1 } });
  ws.serverSends({ type: "gap", after: 6, oldest: 9 });
  const msgs = events.filter((e) => e.type === "message").map((e) => [e.ev.id, e.ev.data]);
  assert.deepEqual(msgs, [[5, "a"], [6, { n: 1 }]]);
  assert.equal(events.find((e) => e.type === "message" && e.ev.id === 6).ev.mid, "m6");
  assert.equal(events.find((e) => e.type === "message" && e.ev.id === 6).ev.traceparent, tp);
  assert.equal(events.find((e) => e.type === "message" && e.ev.id === 5).ev.traceparent, undefined);
  assert.deepEqual(ws.sent, [{ type: "ack", id: 5 }, { type: "ack", id: 6 }]);
  assert.deepEqual(events.find((e) => e.type === "gap").ev, { after: 6, oldest: 9 });
  assert.equal(c.lastId, 6);
  c.stop();
  assert.equal(ws.closedByClient, 1000);
  assert.deepEqual(events.at(-1), { type: "disconnected", ev: { reason: "stopped", willReconnect: false } });
});

test("manual acks: nothing is acked until ack(), and each id once", async () => {
  const { c, events } = client({ autoAck: false });
  c.start();
  await until("socket", () => FakeWs.all.length === 1);
  const ws = FakeWs.all[0];
  ws.hello();
  ws.serverSends({ type: "message", id: 1, data: "x" });
  assert.deepEqual(ws.sent, []);
  const m = events.find((e) => e.type === "message").ev;
  m.ack();
  m.ack();
  c.ack(1);
  assert.deepEqual(ws.sent, [{ type: "ack", id: 1 }]);
  c.stop();
});

test("reconnect: the new connection opens first, resumes from the last id, then the old one closes", async () => {
  const { c, events } = client();
  c.start();
  await until("socket", () => FakeWs.all.length === 1);
  const old = FakeWs.all[0];
  old.hello();
  old.serverSends({ type: "message", id: 10, data: "a" });
  old.serverSends({ type: "reconnect", reason: "rotate", grace_ms: 30_000 });
  await until("second socket", () => FakeWs.all.length === 2);
  const neu = FakeWs.all[1];
  assert.equal(neu.url, "ws://a:1/ws?since=10", "rotation stays on the same node");
  assert.equal(old.closedByClient, null, "the old connection stays until the new one is up");
  // Still delivering on the old one meanwhile.
  old.serverSends({ type: "message", id: 11, data: "b" });
  neu.hello();
  assert.equal(old.closedByClient, 1000);
  // The backlog repeats 11 (the old connection had it): dropped.
  neu.serverSends({ type: "message", id: 11, data: "b" });
  neu.serverSends({ type: "message", id: 12, data: "c" });
  assert.deepEqual(events.filter((e) => e.type === "message").map((e) => e.ev.id), [10, 11, 12]);
  assert.equal(events.filter((e) => e.type === "disconnected").length, 0);
  assert.equal(events.filter((e) => e.type === "connected").length, 2);
  c.stop();
});

test("drain moves to the next address", async () => {
  const { c } = client();
  c.start();
  await until("socket", () => FakeWs.all.length === 1);
  FakeWs.all[0].hello();
  FakeWs.all[0].serverSends({ type: "reconnect", reason: "drain", grace_ms: 1000 });
  await until("second socket", () => FakeWs.all.length === 2);
  assert.equal(FakeWs.all[1].url, "ws://b:2/ws?since=0");
  c.stop();
});

test("a server close is reported with its code, then the client reconnects with since", async () => {
  const { c, events } = client();
  c.start();
  await until("socket", () => FakeWs.all.length === 1);
  const ws = FakeWs.all[0];
  ws.hello();
  ws.serverSends({ type: "message", id: 3, data: "a" });
  ws.serverCloses(4008);
  const d = events.find((e) => e.type === "disconnected").ev;
  assert.equal(d.reason, "closed");
  assert.equal(d.code, 4008);
  assert.equal(d.willReconnect, true);
  assert.ok(d.retryInMs >= 0 && d.retryInMs < 5);
  await until("reconnect", () => FakeWs.all.length === 2);
  assert.equal(FakeWs.all[1].url, "ws://a:1/ws?since=3", "a node that said hello is tried again first");
  c.stop();
});

test("failures before hello back off, move on to the next address and refresh the token", async () => {
  let calls = 0;
  const { c, events } = client({ token: () => `tok${++calls}` });
  c.start();
  await until("socket", () => FakeWs.all.length === 1);
  FakeWs.all[0].serverCloses(1006);
  await until("retry", () => FakeWs.all.length === 2);
  assert.equal(FakeWs.all[1].url, "ws://b:2/ws?since=0");
  assert.deepEqual(FakeWs.all[1].protocols, ["push.v1", "tok2"]);
  assert.equal(events.find((e) => e.type === "disconnected").ev.reason, "network");
  c.stop();
});

test("a token close to its expiry is fetched again before connecting", async () => {
  let calls = 0;
  const soon = Math.floor(Date.now() / 1000) + 30; // inside the default 60 s margin
  const { c } = client({ token: () => (++calls, jwt({ sub: "u", exp: soon })) });
  c.start();
  await until("socket", () => FakeWs.all.length === 1);
  FakeWs.all[0].hello();
  FakeWs.all[0].serverCloses(1001);
  await until("reconnect", () => FakeWs.all.length === 2);
  assert.equal(calls, 2, "the cached token was within the refresh margin");
  c.stop();
});

test("a silent connection is taken for dead after heartbeatFactor intervals; pings are sent meanwhile", async () => {
  const { c, events } = client({ heartbeatFactor: 3 });
  c.start();
  await until("socket", () => FakeWs.all.length === 1);
  const ws = FakeWs.all[0];
  ws.hello({ heartbeat_ms: 60 });
  await until("ping", () => ws.sent.some((m) => m.type === "ping"));
  await until("dead connection detected", () => events.some((e) => e.type === "disconnected"));
  assert.equal(events.find((e) => e.type === "disconnected").ev.reason, "heartbeat_timeout");
  assert.equal(ws.closedByClient, 1000);
  await until("reconnect", () => FakeWs.all.length === 2);
  c.stop();
});

test("a bad URL is refused at construction", () => {
  assert.throws(() => new PushClient({ url: "not a url", token: "t" }), TypeError);
  assert.throws(() => new PushClient({ url: [], token: "t" }), /at least one address/);
});

test("SSE: token in the Authorization header, resume point in Last-Event-ID and since, acks batched", async () => {
  const requests = [];
  let push;
  const body = new ReadableStream({
    start(controller) {
      push = (text) => controller.enqueue(new TextEncoder().encode(text));
    },
  });
  const fetch = async (url, init) => {
    requests.push({ url, init });
    if (init.method === "POST") return new Response('{"accepted":2}', { status: 202 });
    return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
  };
  const c = new PushClient({ url: "http://h:1", token: "t", transport: "sse", lastId: 41, fetch });
  const got = [];
  c.on("message", (m) => got.push([m.id, m.data, m.traceparent]));
  c.start();
  await until("the SSE request", () => requests.length === 1);
  assert.equal(requests[0].url, "http://h:1/sse?since=41");
  assert.equal(requests[0].init.headers.Authorization, "Bearer t");
  assert.equal(requests[0].init.headers["Last-Event-ID"], "41");
  push('event: hello\ndata: {"type":"hello","heartbeat_ms":30000}\n\n: hb\n\n');
  const tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  push(`id: 42\nevent: message\ndata: a\ndata: b\n\nid: 43\nevent: message\ntraceparent: ${tp}\ndata: c\n\n`);
  await until("two messages", () => got.length === 2);
  assert.deepEqual(got, [[42, "a\nb", undefined], [43, "c", tp]]);
  await until("one ack request for both", () => requests.length === 2);
  assert.equal(requests[1].url, "http://h:1/ack?id=42,43");
  assert.equal(requests[1].init.headers.Authorization, "Bearer t");
  c.stop();
});
