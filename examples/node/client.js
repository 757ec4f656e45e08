#!/usr/bin/env node
// Call services on (or behind) a pigeon node: Request -> Reply.
//
//   node client.js --url tcp://127.0.0.1:5555 --call upper=hello --count 10 --timeout 5
//
// --call SERVICE=PAYLOAD (repeatable) is called --count times each, all at
// once. What it does, by docs/protocol.md:
// - Hello first; then one Request [request_id, service, message, timeout]
//   per call. The message carries the absolute deadline (wall clock,
//   float) and `timeout` what is left of it (float seconds).
// - A Reply is matched by request_id. An empty error_kind is an answer;
//   otherwise error_kind says why (Rejected, Timeout, NoResponders,
//   Forbidden, Busy) and `error` is text for people.
// - No Reply by the deadline is reported as a local timeout: a node never
//   answers a request whose deadline passed before it was read.
// Prints one JSON line: every call with its outcome.

import { frame, makeMessage, messageText, newId } from "./lib/wire.js";
import { parseArgs, Peer } from "./lib/peer.js";

const args = parseArgs(process.argv.slice(2), {
  url: "",
  call: [],
  count: 1,
  timeout: 5.0,
  heartbeat: 1.0,
  connectTimeout: 60,
});

const waiting = new Map(); // request_id -> resolve
let lateReplies = 0;

const peer = new Peer(args.url, {
  role: "client",
  heartbeat: args.heartbeat,
  onFrame: (f) => {
    if (f.type !== "Reply") return;
    const resolve = waiting.get(f.requestId);
    if (resolve) resolve(f);
    else lateReplies += 1; // answered after we gave up on it
  },
});

function call(service, payload) {
  const requestId = newId();
  const started = Date.now() / 1000;
  const deadline = started + args.timeout;
  const message = makeMessage(payload, { deadline });
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      waiting.delete(requestId);
      resolve({ service, payload, ok: false, errorKind: "", error: `no reply within ${args.timeout} s`, timedOut: true });
    }, args.timeout * 1000);
    waiting.set(requestId, (reply) => {
      clearTimeout(timer);
      waiting.delete(requestId);
      const seconds = Date.now() / 1000 - started;
      if (reply.errorKind === "" && reply.message !== null) {
        resolve({ service, payload, ok: true, answer: messageText(reply.message), contentType: reply.message.contentType, seconds });
      } else {
        resolve({ service, payload, ok: false, errorKind: reply.errorKind, error: reply.error, timedOut: false, seconds });
      }
    });
    peer.send(frame.request(requestId, service, message, Math.max(0, deadline - Date.now() / 1000)));
  });
}

async function main() {
  const started = Date.now() / 1000;
  await peer.start(args.connectTimeout);
  const calls = [];
  for (const spec of args.call) {
    const at = spec.indexOf("=");
    const service = at < 0 ? spec : spec.slice(0, at);
    const payload = at < 0 ? "" : spec.slice(at + 1);
    for (let i = 0; i < args.count; i++) calls.push(call(service, args.count > 1 ? `${payload} ${i}` : payload));
  }
  const results = await Promise.all(calls);
  for (const r of results) {
    if (!r.ok) process.stderr.write(`client: ${r.service}: ${r.errorKind || "timeout"}: ${r.error}\n`);
  }
  await peer.close();
  const summary = { role: "client", calls: results, lateReplies, seconds: Date.now() / 1000 - started, peer: peer.stats };
  process.stdout.write(JSON.stringify(summary) + "\n");
  process.exit(0);
}

main().catch((err) => {
  process.stderr.write(`client: ${err.stack ?? err}\n`);
  process.exit(2);
});
