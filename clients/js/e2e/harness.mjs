// Real processes for the end-to-end tests: redis-server, librdkafka's mock cluster
// (testkit's `kafka-mock` binary), push-server nodes sharing a Redis registry, a
// msg-processor, and push-send. The Rust binaries are built with cargo first (a no-op when
// they are up to date); CARGO_TARGET_DIR is honoured.
import { execFileSync, spawn } from "node:child_process";
import { once } from "node:events";
import { linkSync, mkdirSync, rmSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, "../../..");
export const artifacts = path.resolve(here, "../test-artifacts");

/** Generous: a loaded 2-core CI machine; a hang still ends the test. */
export const WAIT_MS = 60_000;

export async function until(what, cond, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

let bins = null;
/** Builds the binaries the tests run and returns their paths. */
export function binaries() {
  if (bins) return bins;
  // PUSH_E2E_BIN_DIR: a directory with the four binaries, built by the caller; no cargo run.
  const given = process.env.PUSH_E2E_BIN_DIR;
  if (given) {
    bins = Object.fromEntries(["push-server", "msg-processor", "push-send", "kafka-mock"].map((b) => [b, path.join(given, b)]));
    return bins;
  }
  execFileSync(
    "cargo",
    ["build", "--quiet", "-p", "push-server", "-p", "msg-processor", "-p", "push-lib", "-p", "testkit",
      "--features", "testkit/kafka", "--bins"],
    { cwd: repoRoot, stdio: ["ignore", "inherit", "inherit"] },
  );
  const meta = JSON.parse(
    execFileSync("cargo", ["metadata", "--format-version", "1", "--no-deps"], { cwd: repoRoot, maxBuffer: 64 << 20 }),
  );
  const dir = path.join(meta.target_directory, "debug");
  // Hard links taken right after the build: another cargo run on a shared target directory
  // may replace the files under their names, never the files these links keep.
  const own = path.join(meta.target_directory, `push-e2e-bins-${process.pid}`);
  mkdirSync(own, { recursive: true });
  process.on("exit", () => rmSync(own, { recursive: true, force: true }));
  bins = Object.fromEntries(
    ["push-server", "msg-processor", "push-send", "kafka-mock"].map((b) => {
      const link = path.join(own, b);
      linkSync(path.join(dir, b), link);
      return [b, link];
    }),
  );
  return bins;
}

/** Every process started here, stopped by `stopAll()` (and killed if the test process dies). */
const procs = new Set();

export function start(cmd, args, name) {
  const p = spawn(cmd, args, { stdio: ["pipe", "pipe", "pipe"] });
  p.name = name;
  p.output = "";
  const keep = (chunk) => {
    p.output += chunk.toString();
    if (p.output.length > 200_000) p.output = p.output.slice(-100_000);
  };
  p.stdout.on("data", keep);
  p.stderr.on("data", keep);
  p.on("error", (e) => {
    p.output += `\nspawn error: ${e}`;
  });
  procs.add(p);
  p.on("exit", () => procs.delete(p));
  return p;
}

export async function stopAll() {
  await Promise.all([...procs].map((p) => stop(p)));
}

export async function stop(p, signal = "SIGKILL") {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const exited = once(p, "exit");
  p.kill(signal);
  await exited;
}

process.on("exit", () => {
  for (const p of procs) p.kill("SIGKILL");
});

/** Waits for a line of the process's output matching `re`; fails with the output so far. */
export async function waitOutput(p, re, what) {
  try {
    return await until(what, () => {
      if (p.exitCode !== null) throw new Error(`${p.name} exited (${p.exitCode}) before ${what}`);
      return re.exec(p.output);
    });
  } catch (e) {
    e.message += `\n--- ${p.name} output ---\n${p.output.slice(-4000)}`;
    throw e;
  }
}

export async function freePort() {
  const srv = net.createServer();
  srv.listen(0, "127.0.0.1");
  await once(srv, "listening");
  const { port } = srv.address();
  srv.close();
  await once(srv, "close");
  return port;
}

export async function redis() {
  const port = await freePort();
  const p = start("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], "redis-server");
  await waitOutput(p, /Ready to accept connections/, "redis-server to start");
  return { proc: p, url: `redis://127.0.0.1:${port}` };
}

export async function kafkaMock(topics) {
  const args = topics.flatMap((t) => ["--topic", t]);
  const p = start(binaries()["kafka-mock"], args, "kafka-mock");
  const m = await waitOutput(p, /^(\S+:\d+\S*)\s*$/m, "the mock cluster's bootstrap servers");
  return { proc: p, brokers: m[1] };
}

export const SECRET = "clients-e2e-secret-0123456789abcdef";

/** A push-server node; resolves once its banner names its addresses. */
export async function node(id, registry, extra = [], { demo = true } = {}) {
  const p = start(
    binaries()["push-server"],
    ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--node-id", id, "--auth-secret", SECRET,
      "--registry", registry, "--per-ip-rate", "0", ...(demo ? ["--demo"] : []), ...extra],
    `push-server ${id}`,
  );
  const c = await waitOutput(p, /clients\s+ws:\/\/(\S+)\/ws/, `node ${id} to listen`);
  const a = await waitOutput(p, /admin\s+http:\/\/(\S+)/, `node ${id}'s admin port`);
  return { id, proc: p, ws: `ws://${c[1]}`, http: `http://${c[1]}`, admin: `http://${a[1]}` };
}

export function token(user, device) {
  const args = ["token", "--user", user, "--auth-secret", SECRET, "--ttl", "1h"];
  if (device) args.push("--device", device);
  return execFileSync(binaries()["push-server"], args).toString().trim();
}

export async function push(adminUrl, user, text, query = "") {
  const res = await fetch(`${adminUrl}/v1/push/${encodeURIComponent(user)}${query}`, { method: "POST", body: text });
  const body = await res.text();
  if (!res.ok) throw new Error(`push to ${user} answered ${res.status}: ${body}`);
  return JSON.parse(body);
}

/**
 * A static site on 127.0.0.1:0 for pages that are not the demo: `/dist/*` from clients/js/dist
 * (the client and its shared worker), `/tab.html` from e2e/worker-tab.html. The pages reach
 * push-server's client port by WebSocket, which browsers allow across origins.
 */
export async function site() {
  const { createServer } = await import("node:http");
  const { readFile } = await import("node:fs/promises");
  const dist = path.resolve(here, "../dist");
  const srv = createServer(async (req, res) => {
    const p = new URL(req.url, "http://x").pathname;
    const file = p === "/tab.html" ? path.join(here, "worker-tab.html")
      : /^\/dist\/[\w.-]+\.js$/.test(p) ? path.join(dist, p.slice("/dist/".length)) : null;
    try {
      if (!file) throw new Error("not found");
      const body = await readFile(file);
      res.writeHead(200, { "content-type": file.endsWith(".html") ? "text/html; charset=utf-8" : "text/javascript", "cache-control": "no-store" });
      res.end(body);
    } catch {
      res.writeHead(404, { "content-type": "text/plain" });
      res.end("not found\n");
    }
  });
  srv.listen(0, "127.0.0.1");
  await once(srv, "listening");
  return { url: `http://127.0.0.1:${srv.address().port}`, close: () => srv.close() };
}
