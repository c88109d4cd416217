// The demo page's script: connects with the client from clients/js and shows each message's
// data as text (never as HTML). Query parameters: token, server (comma-separated client port
// addresses), share=1 (one connection for all tabs; share=locks without the SharedWorker),
// transport=ws|sse.
import { PushClient } from "./push-client.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const serverInput = $("server");
serverInput.value =
  params.get("server") || `ws://${location.hostname}:${serverInput.dataset.defaultPort}`;
$("token").value = params.get("token") || "";

const state = { client: null, messages: [], events: [] };
// For automation (the end-to-end tests read it) and for poking around in the console.
window.demo = state;

function log(line) {
  state.events.push(line);
  $("log").textContent = state.events.slice(-20).join("\n");
}

function setStatus(s) {
  $("status").dataset.state = s;
  $("status").textContent = s;
}

function userOf(token) {
  try {
    const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(b64)).sub || "";
  } catch {
    return "";
  }
}

function connect() {
  state.client?.stop();
  const token = $("token").value.trim();
  if (!token) {
    setStatus("no token");
    return;
  }
  if (!$("user").value) $("user").value = userOf(token);
  const client = new PushClient({
    url: serverInput.value.split(",").map((s) => s.trim()).filter(Boolean),
    token: () => $("token").value.trim(),
    transport: params.get("transport") === "sse" ? "sse" : "ws",
    // share=1: one connection for all tabs, through a SharedWorker where the browser has one;
    // share=locks: the Web Locks + BroadcastChannel mode instead.
    share: params.has("share") && params.get("share") !== "0",
    shareMode: params.get("share") === "locks" ? "locks" : "auto",
  });
  state.client = client;
  client.on("role", ({ role }) => {
    $("role").textContent = `(${role})`;
    if (role === "follower") setStatus("shared: another tab holds the connection");
    log(`role ${role}`);
  });
  client.on("connected", (e) => {
    setStatus("connected");
    log(`connected to ${e.node} as ${e.user} (conn ${e.connId}, since ${e.since})`);
  });
  client.on("disconnected", (e) => {
    setStatus("disconnected");
    log(`disconnected: ${e.reason}${e.code ? ` (close code ${e.code})` : ""}`);
  });
  client.on("gap", (e) => log(`gap: messages after ${e.after} before ${e.oldest} are lost`));
  client.on("error", (e) => log(`error ${e.code}: ${e.message}`));
  client.on("message", (m) => {
    state.messages.push({ id: m.id, mid: m.mid ?? null, data: m.data });
    const li = document.createElement("li");
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = String(m.id);
    li.append(id, typeof m.data === "string" ? m.data : JSON.stringify(m.data));
    $("messages").prepend(li);
  });
  setStatus("connecting");
  client.start();
}

$("connect").addEventListener("submit", (ev) => {
  ev.preventDefault();
  connect();
});
$("disconnect-button").addEventListener("click", () => {
  state.client?.stop();
  setStatus("stopped");
});
$("send").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const headers = { "Content-Type": "text/plain" };
  const admin = $("admin-token").value;
  if (admin) headers.Authorization = `Bearer ${admin}`;
  try {
    const res = await fetch(`/v1/push/${encodeURIComponent($("user").value)}`, {
      method: "POST",
      headers,
      body: $("text").value,
    });
    $("send-result").textContent = `${res.status} ${await res.text()}`;
  } catch (e) {
    $("send-result").textContent = String(e);
  }
});

if ($("token").value) connect();
