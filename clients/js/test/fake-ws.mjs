// Test doubles shared by the unit tests: a scripted WebSocket stand-in (its server side is
// driven by the test) and polling for a condition. Not a test file itself.

/** A WebSocket whose server side the test scripts; every instance is kept in `FakeWs.all`. */
export class FakeWs {
  static all = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.readyState = 1;
    this.sent = [];
    this.closedByClient = null;
    this.onmessage = this.onclose = this.onerror = this.onopen = null;
    FakeWs.all.push(this);
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close(code) {
    this.closedByClient = code ?? 1005;
    this.readyState = 3;
  }
  // Server side of the script.
  serverSends(obj) {
    this.onmessage?.({ data: JSON.stringify(obj) });
  }
  serverCloses(code) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "" });
  }
  hello(extra = {}) {
    this.serverSends({ type: "hello", version: 1, conn_id: FakeWs.all.indexOf(this), node: "n", user: "u", lifetime_ms: 1000, heartbeat_ms: 30_000, ...extra });
  }
}

/** Waits until `cond()` holds, polling; fails naming `what` after 10 s. */
export async function until(what, cond) {
  const deadline = Date.now() + 10_000;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}
