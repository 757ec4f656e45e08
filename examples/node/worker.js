#!/usr/bin/env node
// Consume a queue on a pigeon node and ack every message with Settle.
//
//   node worker.js --url tcp://127.0.0.1:5555 --queue jobs --prefetch 16 --expect 100
//
// What it does, by docs/protocol.md:
// - Hello, then Consume [queue, prefetch, lease_ttl (float), max_attempts];
//   the node answers with a Verdict saying what it granted.
// - Deliver frames (alone or inside a Batch) bring messages leased to us;
//   they are run one at a time, in order, and each is acked once run. Acks
//   made in the same tick leave together in one Settle.
// - A message whose deadline has passed is not run: it is rejected with
//   the reason `expired` (the host dead-letters it).
// - Hello goes out every --heartbeat seconds, also while a job runs:
//   without it the node would take our leases back after 3 intervals.
//   --hold-first S makes the first job last S seconds to show that.
// - If the node restarts or forgets us, Consume is sent again.
// Stops after --expect distinct messages (or --idle seconds without any),
// sends Cancel, and prints one JSON line.

import { frame, messageText } from "./lib/wire.js";
import { parseArgs, Peer, sleep } from "./lib/peer.js";

const args = parseArgs(process.argv.slice(2), {
  url: "",
  queue: "jobs",
  prefetch: 16,
  leaseTtl: 60.0,
  expect: 0,
  idle: 30,
  holdFirst: 0,
  workMs: 0,
  heartbeat: 1.0,
  timeout: 120,
});

const inbox = []; // deliveries not yet run, in order
const seen = new Set();
const acked = [];
let duplicates = 0;
let redelivered = 0;
let expired = 0;
let verdict = null;
let acks = [];
let rejects = [];
let settleQueued = false;
let lastDelivery = Date.now();

const peer = new Peer(args.url, {
  role: "worker",
  heartbeat: args.heartbeat,
  onFrame,
  onReset: () => consume(), // the node restarted or forgot us: register again
});

function consume() {
  peer.send(frame.consume(args.queue, { prefetch: args.prefetch, leaseTtl: args.leaseTtl, maxAttempts: 0 }));
}

function onFrame(f) {
  if (f.type === "Verdict" && f.name === args.queue) {
    verdict = f;
    if (!f.allowed) process.stderr.write(`worker: the node refused Consume ${args.queue}: ${f.reason}\n`);
  } else if (f.type === "Deliver" && f.queue === args.queue) {
    lastDelivery = Date.now();
    inbox.push(...f.messages);
  }
}

function settle(kind, item) {
  (kind === "ack" ? acks : rejects).push(item);
  if (!settleQueued) {
    settleQueued = true;
    setImmediate(() => {
      settleQueued = false;
      // Each settle gives the node one credit back; 10,000 per frame at most.
      while (acks.length || rejects.length) {
        peer.send(frame.settle(args.queue, { acks: acks.splice(0, 10_000), rejects: rejects.splice(0, 10_000) }));
      }
    });
  }
}

async function run(message, index) {
  if (message.deadline !== null && Date.now() / 1000 >= message.deadline) {
    expired += 1;
    settle("reject", [message.id, "expired"]);
    return;
  }
  if (message.redelivered) redelivered += 1;
  if (seen.has(message.id)) duplicates += 1;
  seen.add(message.id);
  messageText(message); // the job: here, read the body as text
  if (index === 0 && args.holdFirst > 0) await sleep(args.holdFirst);
  else if (args.workMs > 0) await sleep(args.workMs / 1000);
  acked.push(message.id);
  settle("ack", message.id);
}

async function main() {
  const started = Date.now();
  await peer.start(args.timeout);
  consume();
  let index = 0;
  const deadline = started + args.timeout * 1000;
  while (Date.now() < deadline) {
    if (args.expect > 0 && seen.size >= args.expect && inbox.length === 0) break;
    if (inbox.length === 0) {
      if (Date.now() - lastDelivery > args.idle * 1000) break;
      await sleep(0.005);
      continue;
    }
    await run(inbox.shift(), index++);
  }
  await sleep(0.05); // let the last Settle leave before Cancel
  peer.send(frame.cancel(args.queue));
  const result = {
    role: "worker",
    queue: args.queue,
    verdict,
    received: seen.size,
    acked,
    duplicates,
    redelivered,
    expired,
    seconds: (Date.now() - started) / 1000,
    peer: peer.stats,
  };
  await peer.close();
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(args.expect > 0 && seen.size < args.expect ? 1 : 0);
}

main().catch((err) => {
  process.stderr.write(`worker: ${err.stack ?? err}\n`);
  process.exit(2);
});
