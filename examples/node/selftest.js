#!/usr/bin/env node
// Checks of lib/wire.js that need no node running.
//
//   node selftest.js encode          one frame of each kind, as {name: hex}
//   node selftest.js decode < FILE   decode {name: hex} (frames made by
//                                    pigeon itself), print them as JSON
//
// tests/test_node_example.py runs both against pigeon's own codec
// (pigeon/_core/frames.py): what Node encodes, msgspec must decode with the
// same msgpack types pigeon writes, and what pigeon encodes, Node must read.
// `encode` also asserts locally that whole floats go out as float64.

import { readFileSync } from "node:fs";
import { decodeAll, encode, encodeBatch, frame, makeMessage, WireError } from "./lib/wire.js";

const hex = (bytes) => Buffer.from(bytes).toString("hex");

function fixedMessage(id, body, extra = {}) {
  return {
    ...makeMessage(body, { id, headers: { "x-k": "v" } }),
    createdAt: 1700000000.0, // whole: must still be a float64
    ...extra,
  };
}

function encodeAll() {
  const m1 = fixedMessage("m-1", "hello");
  const m2 = fixedMessage("m-2", new Uint8Array([0, 1, 2, 255]), { deadline: 1700000030.0 });
  const m3 = fixedMessage("m-3", { n: 1 }, { deadline: 1700000000.5, attempt: 2, redelivered: true });
  const frames = {
    hello: frame.hello({ node: "n1", session: "s1", services: ["upper"], load: 3 }),
    send: frame.send("jobs", [m1, m2, m3]),
    confirm: frame.confirm(["m-1", "m-2"]),
    refuse: frame.refuse([["m-1", "full", "queue 'jobs'"], ["m-2", "too large", "5 > 4 bytes"]]),
    consume: frame.consume("jobs", { prefetch: 16, leaseTtl: 30.0, maxAttempts: 5 }),
    cancel: frame.cancel("jobs", { keepLeases: true }),
    deliver: frame.deliver("jobs", [m1]),
    settle: frame.settle("jobs", { acks: ["m-1"], nacks: [["m-2", 0.0, "handed back"]], rejects: [["m-3", "expired"]], extends: ["m-4"] }),
    request: frame.request("r-1", "upper", m1, 5.0),
    reply: frame.reply("r-1", m1, "", ""),
    reply_error: frame.reply("r-2", null, "ValueError: no", "Rejected"),
    error: frame.error("bad frame"),
    verdict: frame.verdict("consume", "jobs", true, { prefetch: 16, leaseTtl: 30.0 }),
  };
  const out = Object.fromEntries(Object.entries(frames).map(([k, v]) => [k, hex(encode(v))]));
  out.batch = hex(encodeBatch([encode(frames.confirm), encode(frames.deliver)]));

  // Rule 2 of wire.js, checked here: lease_ttl 30.0 is 0xcb + float64.
  const consume = Buffer.from(out.consume, "hex");
  const at = consume.indexOf(Buffer.from([0xcb, 0x40, 0x3e, 0, 0, 0, 0, 0, 0]));
  if (at < 0) throw new Error(`30.0 was not encoded as float64: ${out.consume}`);
  // And a Batch inside a Batch is refused.
  let refused = false;
  try {
    encodeBatch([Buffer.from(out.batch, "hex")]);
  } catch (err) {
    refused = err instanceof WireError;
  }
  if (!refused) throw new Error("a Batch inside a Batch was not refused");
  return out;
}

// JSON for decoded frames: bytes as {"hex": ...}.
function plain(value) {
  if (value instanceof Uint8Array) return { hex: hex(value) };
  if (Array.isArray(value)) return value.map(plain);
  if (value && typeof value === "object") return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  return value;
}

function decodeInput() {
  const input = JSON.parse(readFileSync(0, "utf8"));
  const out = {};
  for (const [name, h] of Object.entries(input)) {
    try {
      const frames = decodeAll(Buffer.from(h, "hex"));
      out[name] = { batched: frames.batched, frames: frames.map(plain) };
    } catch (err) {
      if (!(err instanceof WireError)) throw err;
      out[name] = { error: err.message };
    }
  }
  return out;
}

const mode = process.argv[2];
if (mode === "encode") process.stdout.write(JSON.stringify(encodeAll()) + "\n");
else if (mode === "decode") process.stdout.write(JSON.stringify(decodeInput()) + "\n");
else {
  process.stderr.write("usage: node selftest.js encode | decode < frames.json\n");
  process.exit(2);
}
