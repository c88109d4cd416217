// End to end in a real headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; no browser download): the /demo page of a real push-server, built on this
// client, against two nodes sharing a Redis registry, a msg-processor on librdkafka's mock
// cluster, and push-send. Screenshots go to test-artifacts/ (git-ignored).
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { chromium } from "playwright-core";
import {
  artifacts, binaries, kafkaMock, node, push, redis, site, start, stop, stopAll, token, until, waitOutput,
} from "./harness.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

describe("browser client against real nodes", () => {
  let browser, context, registry, kafka, nodes, processor;
  const sent = new Set(); // every payload pushed to "alice"

  before(async () => {
    assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: scripts/test installs Debian's chromium (apt-get install chromium)`);
    mkdirSync(artifacts, { recursive: true });
    binaries();
    registry = await redis();
    kafka = await kafkaMock(["push:2"]);
    // Short lifetimes so that a rotation happens within the test; a drain window short enough
    // for the test and long enough to be spread.
    const flags = ["--lifetime", "4s", "--lifetime-jitter", "0.25", "--reconnect-grace", "20s",
      "--drain-window", "2s", "--heartbeat-interval", "5s"];
    nodes = [await node("a", registry.url, flags), await node("b", registry.url, flags)];
    processor = start(binaries()["msg-processor"],
      ["--brokers", kafka.brokers, "--topic", "push", "--registry", registry.url,
        "--metrics-listen", "127.0.0.1:0", "--session-timeout", "6s"], "msg-processor");
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"],
    });
    context = await browser.newContext();
  });

  after(async () => {
    await browser?.close();
    await stopAll();
  });

  const shot = (page, name) => page.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });
  const pageMessages = (page) => page.evaluate(() => window.demo.messages.map((m) => m.data));
  const pageEvents = (page) => page.evaluate(() => window.demo.events);
  async function expectAll(page, what) {
    await until(what, async () => {
      const got = new Set(await pageMessages(page));
      return [...sent].every((s) => got.has(s));
    }).catch(async (e) => {
      const got = new Set(await pageMessages(page));
      e.message += `\nmissing: ${[...sent].filter((s) => !got.has(s)).join(", ")}\nevents: ${(await pageEvents(page)).join(" | ")}`;
      throw e;
    });
    const got = await pageMessages(page);
    assert.equal(new Set(got).size, got.length, "no message shown twice");
  }

  let page;
  it("the demo page connects with ?token= and shows a push from the admin API", async () => {
    const [a, b] = nodes;
    page = await context.newPage();
    const url = `${a.admin}/demo?server=${encodeURIComponent(`${a.ws},${b.ws}`)}&token=${token("alice", "tab1")}`;
    await page.goto(url);
    await page.waitForFunction(() => window.demo?.client?.connected, null, { timeout: 60_000 });
    sent.add("via the admin API");
    await push(a.admin, "alice", "via the admin API");
    await page.getByText("via the admin API").waitFor({ timeout: 60_000 });
    await shot(page, "1-connected-admin-push");
  });

  it("the page's send form pushes through the admin API", async () => {
    await page.fill("#text", "typed into the page");
    sent.add("typed into the page");
    await page.click("#send-button");
    await page.locator("#messages li", { hasText: "typed into the page" }).waitFor({ timeout: 60_000 });
    assert.match(await page.textContent("#send-result"), /^200 /);
  });

  it("shows data as text, never as markup", async () => {
    const evil = '<img src=x onerror="window.pwned=1">';
    sent.add(evil);
    await push(nodes[0].admin, "alice", evil);
    await page.locator("#messages li", { hasText: evil }).waitFor({ timeout: 60_000 });
    assert.equal(await page.evaluate(() => window.pwned), undefined);
  });

  it("receives a push sent through Kafka and the msg-processor", async () => {
    const sender = start(binaries()["push-send"],
      ["--brokers", kafka.brokers, "--topic", "push", "--user", "alice", "--data", "via kafka"], "push-send");
    sent.add("via kafka");
    await until("push-send to finish", () => sender.exitCode !== null);
    assert.equal(sender.exitCode, 0, sender.output);
    await expectAll(page, "the Kafka message");
  });

  it("survives rotations without losing a message", async () => {
    const connects = async () => (await pageEvents(page)).filter((e) => e.startsWith("connected")).length;
    const before = await connects();
    // Push all the while; each node hands pushes for users it does not hold to the node that does.
    let n = 0;
    while ((await connects()) < before + 2) {
      const text = `rotation ${n++}`;
      sent.add(text);
      await push(nodes[n % 2].admin, "alice", text);
      await new Promise((r) => setTimeout(r, 100));
      assert.ok(n < 1200, "two rotations within two minutes (lifetime 4 s)");
    }
    await expectAll(page, "every message pushed across the rotations");
    await shot(page, "2-after-rotations");
  });

  it("survives a node drain without losing a message", async () => {
    const node = await page.evaluate(() => {
      const line = window.demo.events.filter((e) => e.startsWith("connected")).at(-1);
      return / to (\S+) /.exec(line)[1];
    });
    const draining = nodes.find((x) => x.id === node);
    const other = nodes.find((x) => x.id !== node);
    draining.proc.kill("SIGTERM");
    let n = 0;
    while (draining.proc.exitCode === null && draining.proc.signalCode === null) {
      const text = `drain ${n++}`;
      sent.add(text);
      await push(other.admin, "alice", text);
      await new Promise((r) => setTimeout(r, 100));
      assert.ok(n < 1200, `node ${node} finished its drain within two minutes\n${draining.proc.output.slice(-2000)}`);
    }
    for (let i = 0; i < 5; i++) {
      sent.add(`after drain ${i}`);
      await push(other.admin, "alice", `after drain ${i}`);
    }
    await expectAll(page, "every message pushed across the drain");
    const events = await pageEvents(page);
    assert.ok(events.some((e) => e.startsWith(`connected to ${other.id} `)), events.join(" | "));
    nodes = [other];
    await shot(page, "3-after-drain");
  });

  it("acknowledges, and the backend sees the delivery receipt", async () => {
    const [n] = nodes;
    const res = await push(n.admin, "alice", "receipt please", "?wait_receipt=20s");
    sent.add("receipt please");
    assert.ok(res.receipt, `a receipt within 20 s: ${JSON.stringify(res)}`);
    assert.equal(res.receipt.user, "alice");
    assert.equal(res.receipt.device, "tab1");
    assert.equal(res.receipt.transport, "ws");
    assert.equal(res.receipt.id, res.id);
    await expectAll(page, "the receipt message");
    await page.close();
  });

  it("a second tab shares the first tab's connection", async () => {
    const [n] = nodes;
    const url = `${n.admin}/demo?share=locks&server=${encodeURIComponent(n.ws)}&token=${token("bob", "shared")}`;
    const first = await context.newPage();
    await first.goto(url);
    await first.waitForFunction(() => window.demo?.client?.connected, null, { timeout: 60_000 });
    const second = await context.newPage();
    await second.goto(url);
    await second.waitForFunction(() => window.demo?.client?.role === "follower", null, { timeout: 60_000 });
    await push(n.admin, "bob", "to both tabs");
    for (const p of [first, second]) await p.getByText("to both tabs").waitFor({ timeout: 60_000 });
    // The follower never opened a connection of its own; the node holds one for bob (two for a
    // moment while a rotation replaces it: poll).
    assert.equal(await second.evaluate(() => window.demo.client.connected), false);
    await until("one connection for two tabs", async () => {
      const users = await (await fetch(`${n.admin}/v1/users/bob`)).json();
      return users.connections.length === 1;
    });
    await shot(second, "4-second-tab-follower");
    // The leader tab goes away: the other one takes over and resumes where the leader was.
    await first.close();
    await second.waitForFunction(() => window.demo.client.role === "leader" && window.demo.client.connected, null, { timeout: 60_000 });
    await push(n.admin, "bob", "after the leader left");
    await second.getByText("after the leader left").waitFor({ timeout: 60_000 });
    await shot(second, "5-second-tab-leader");
    await second.close();
  });

  it("two tabs share one connection through a SharedWorker; an ack from either reaches it", async () => {
    const [n] = nodes;
    const web = await site();
    try {
      const connections = async () => (await (await fetch(`${n.admin}/v1/users/dave`)).json()).connections.length;
      const url = `${web.url}/tab.html?server=${encodeURIComponent(n.ws)}&token=${token("dave", "worker")}`;
      const first = await context.newPage();
      await first.goto(url);
      await first.waitForFunction(() => window.tab.client.role === "shared" && window.tab.client.connected, null, { timeout: 60_000 });
      // Only the second tab acknowledges (autoAck is off in both).
      const second = await context.newPage();
      await second.goto(`${url}&ack=1`);
      await second.waitForFunction(() => window.tab.client.connected && window.tab.client.tabs === 2, null, { timeout: 60_000 });
      const res = await push(n.admin, "dave", "to both tabs via the worker", "?wait_receipt=20s");
      for (const p of [first, second]) await p.getByText("to both tabs via the worker").waitFor({ timeout: 60_000 });
      assert.ok(res.receipt, `the second tab's ack reached the worker's connection: ${JSON.stringify(res)}`);
      assert.equal(res.receipt.device, "worker");
      // The node holds one connection for both tabs (two for a moment while a rotation replaces
      // it: poll).
      await until("one connection for two tabs", async () => (await connections()) === 1);
      const events = await first.evaluate(() => window.tab.events);
      assert.ok(!events.some((e) => e.startsWith("error shared_worker")), events.join(" | "));
      await shot(second, "6-shared-worker-two-tabs");
      // The first tab closes: the worker notices (its Web Lock is released) and goes on for the other.
      await first.close();
      await second.waitForFunction(() => window.tab.client.tabs === 1, null, { timeout: 60_000 });
      await push(n.admin, "dave", "after the first tab left");
      await second.getByText("after the first tab left").waitFor({ timeout: 60_000 });
      await until("still one connection", async () => (await connections()) === 1);
      await shot(second, "7-shared-worker-one-tab-left");
      await second.close();
      await until("the connection closed with the last tab", async () => (await connections()) === 0);
    } finally {
      web.close();
    }
  });
});

describe("without a browser", () => {
  after(stopAll);
  it("serves no demo page unless --demo", async () => {
    const n = await node("nodemo", "memory", [], { demo: false });
    assert.equal((await fetch(`${n.admin}/demo`)).status, 404);
    await stop(n.proc);
  });

  it("connects, resumes, acknowledges over POST /ack, and the receipt arrives", async () => {
    const { PushClient } = await import("../dist/index.js");
    const n = await node("sse", "memory");
    const got = [];
    const tok = token("carol", "node");
    await push(n.admin, "carol", "kept before connecting");
    const client = new PushClient({ url: n.http, transport: "sse", token: () => tok, lastId: 0 });
    const connected = [];
    client.on("connected", (e) => connected.push(e));
    client.on("message", (m) => got.push(m.data));
    client.start();
    try {
      await until("the kept message (resume from 0)", () => got.includes("kept before connecting"));
      assert.equal(connected[0].transport, "sse");
      const res = await push(n.admin, "carol", "line one\nline two", "?wait_receipt=20s");
      assert.ok(res.receipt, JSON.stringify(res));
      assert.equal(res.receipt.transport, "sse");
      assert.ok(got.includes("line one\nline two"));
    } finally {
      client.stop();
      await stop(n.proc);
    }
  });
});
