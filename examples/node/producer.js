#!/usr/bin/env node
// Send messages to a queue on a pigeon node and wait for each Confirm.
//
//   node producer.js --url tcp://127.0.0.1:5555 --queue jobs --count 100
//
// What it does, by docs/protocol.md:
// - Hello first; nothing is sent before the node answered.
// - Send frames carry what is queued at that moment (up to --window
//   unconfirmed messages), each message with its own id.
// - Confirm settles those ids. A Refuse with `full` or `store failed` is
//   retried later with the same id (the host de-duplicates on it) until
//   --give-up seconds have passed; `too large` and `forbidden` are final.
// - Unconfirmed sends are resent with their ids when the node restarts or
//   forgets us, and after --resend-after seconds of silence about them.
// Prints one JSON line at the end: confirmed ids, refusals, failures.

import { frame, makeMessage, RETRYABLE_REFUSALS } from "./lib/wire.js";
import { parseArgs, Peer, sleep } from "./lib/peer.js";

const args = parseArgs(process.argv.slice(2), {
  url: "",
  queue: "jobs",
  count: 10,
  window: 64,
  giveUp: 30,
  resendAfter: 5,
  heartbeat: 1.0,
  timeout: 60,
  prefix: "from node",
});

const pending = new Map(); // id -> {message, firstSent, lastSent, retryAt}
const confirmed = [];
const failed = []; // [{id, reason, detail}]
const refusals = {}; // reason -> count
let unsent = [];
let flushQueued = false;

const peer = new Peer(args.url, {
  role: "producer",
  heartbeat: args.heartbeat,
  onFrame,
  onReset: () => {
    for (const p of pending.values()) queueSend(p); // same ids: the host de-duplicates
  },
});

function onFrame(f) {
  if (f.type === "Confirm") {
    for (const id of f.ids) {
      if (pending.delete(id)) confirmed.push(id);
    }
  } else if (f.type === "Refuse") {
    const now = Date.now() / 1000;
    for (const { id, reason, detail } of f.refusals) {
      const p = pending.get(id);
      if (!p) continue;
      refusals[reason] = (refusals[reason] ?? 0) + 1;
      if (RETRYABLE_REFUSALS.includes(reason) && now - p.firstSent < args.giveUp) {
        p.attempts += 1;
        p.retryAt = now + Math.min(2, 0.05 * 2 ** p.attempts); // back off, then try again
      } else {
        pending.delete(id);
        failed.push({ id, reason, detail });
      }
    }
  }
}

function queueSend(p) {
  p.retryAt = Infinity;
  unsent.push(p);
  if (!flushQueued) {
    flushQueued = true;
    // Everything queued in this tick goes in one Send frame (protocol
    // "Batching"), at most 10,000 messages a frame.
    setImmediate(() => {
      flushQueued = false;
      const now = Date.now() / 1000;
      const batch = unsent.splice(0);
      for (let i = 0; i < batch.length; i += 10_000) {
        const run = batch.slice(i, i + 10_000);
        for (const q of run) q.lastSent = now;
        peer.send(frame.send(args.queue, run.map((q) => q.message)));
      }
    });
  }
}

async function main() {
  const started = Date.now() / 1000;
  await peer.start(args.timeout);
  let made = 0;
  const deadline = started + args.timeout;
  while ((made < args.count || pending.size > 0) && Date.now() / 1000 < deadline) {
    while (made < args.count && pending.size < args.window) {
      const message = makeMessage(`${args.prefix} ${made}`, { headers: { "x-example": "node-producer" } });
      const p = { message, firstSent: Date.now() / 1000, lastSent: 0, retryAt: Infinity, attempts: 0 };
      pending.set(message.id, p);
      queueSend(p);
      made += 1;
    }
    await sleep(0.01);
    const now = Date.now() / 1000;
    for (const p of pending.values()) {
      if (p.retryAt <= now) queueSend(p);
      else if (p.retryAt === Infinity && p.lastSent && now - p.lastSent > args.resendAfter) {
        queueSend(p); // no word about it: resend, same id
      }
    }
  }
  const result = {
    role: "producer",
    queue: args.queue,
    made,
    confirmed,
    refusals,
    failed,
    unconfirmed: [...pending.keys()],
    seconds: Date.now() / 1000 - started,
    peer: peer.stats,
  };
  await peer.close();
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(pending.size === 0 ? 0 : 1);
}

main().catch((err) => {
  process.stderr.write(`producer: ${err.stack ?? err}\n`);
  process.exit(2);
});
