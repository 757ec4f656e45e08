#!/usr/bin/env node
// lib/wire.js against pigeon's protocol test vectors
// (docs/protocol-vectors.json, written by scripts/protocol_vectors.py).
//
//   node vectors.js [FILE]
//
// For every vector: its hex decodes to its fields, and (except for those
// under "decode_only", frames as a terser peer may send them) its fields
// encode to exactly its hex. The file's conventions: fields by pigeon's
// (snake_case) names with the frame's `tag`, bin values as {"bin": hex},
// an envelope by its field names, tuples (a refusal, a nack, a reject) as
// arrays. Stops at the first vector that fails, naming it, with exit
// status 1; otherwise prints how many passed, then one JSON line.

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { decode, encode, encodeBatch, frame, TAG, VERSION } from "./lib/wire.js";

const FILE = process.argv[2] ?? join(dirname(fileURLToPath(import.meta.url)), "..", "..", "docs", "protocol-vectors.json");

const hex = (bytes) => Buffer.from(bytes).toString("hex");
const bin = (value) => {
  if (value === null || typeof value !== "object" || typeof value.bin !== "string") {
    throw new Error(`expected {"bin": hex}, not ${JSON.stringify(value)}`);
  }
  return new Uint8Array(Buffer.from(value.bin, "hex"));
};

// -- wire.js's decoded frames in the vector file's conventions ------------------

const messageFields = (m) =>
  m === null
    ? null
    : {
        id: m.id,
        body: { bin: hex(m.body) },
        content_type: m.contentType,
        headers: m.headers,
        attempt: m.attempt,
        redelivered: m.redelivered,
        created_at: m.createdAt,
        deadline: m.deadline,
      };

const asFields = {
  Hello: (f) => ({
    node: f.node,
    session: f.session,
    services: f.services,
    hosts_queues: f.hostsQueues,
    load: f.load,
    knows_you: f.knowsYou,
    heartbeat: f.heartbeat,
  }),
  Send: (f) => ({ queue: f.queue, messages: f.messages.map(messageFields) }),
  Confirm: (f) => ({ ids: f.ids }),
  Refuse: (f) => ({ refusals: f.refusals.map((r) => [r.id, r.reason, r.detail]) }),
  Consume: (f) => ({ queue: f.queue, prefetch: f.prefetch, lease_ttl: f.leaseTtl, max_attempts: f.maxAttempts }),
  Cancel: (f) => ({ queue: f.queue, keep_leases: f.keepLeases }),
  Deliver: (f) => ({ queue: f.queue, messages: f.messages.map(messageFields) }),
  Settle: (f) => ({
    queue: f.queue,
    acks: f.acks,
    nacks: f.nacks.map((n) => [n.id, n.delay, n.reason]),
    rejects: f.rejects.map((r) => [r.id, r.reason]),
    extends: f.extends,
  }),
  Request: (f) => ({ request_id: f.requestId, service: f.service, message: messageFields(f.message), timeout: f.timeout }),
  Reply: (f) => ({ request_id: f.requestId, message: messageFields(f.message), error: f.error, error_kind: f.errorKind }),
  Error: (f) => ({ reason: f.reason, queue: f.queue, ids: f.ids }),
  Batch: (f) => ({ frames: f.frames.map((b) => ({ bin: hex(b) })) }),
  Verdict: (f) => ({ verb: f.verb, name: f.name, allowed: f.allowed, prefetch: f.prefetch, lease_ttl: f.leaseTtl, reason: f.reason, trimmed_topic: f.trimmedTopic, first_retained: f.firstRetained }),
  Subscribe: (f) => ({ queue: f.queue, pattern: f.pattern, policy: f.policy, buffer: f.buffer, from_seq: f.fromSeq, from_time: f.fromTime, last: f.last, last_per_subject: f.lastPerSubject }),
};

// -- the vector file's fields through wire.js's encoders ------------------------

const message = (m) =>
  m === null
    ? null
    : {
        id: m.id,
        body: bin(m.body),
        contentType: m.content_type,
        headers: m.headers,
        attempt: m.attempt,
        redelivered: m.redelivered,
        createdAt: m.created_at,
        deadline: m.deadline,
      };

const encoders = {
  Hello: (f) =>
    encode(
      frame.hello({
        node: f.node,
        session: f.session,
        services: f.services,
        hostsQueues: f.hosts_queues,
        load: f.load,
        knowsYou: f.knows_you,
        heartbeat: f.heartbeat,
      }),
    ),
  Send: (f) => encode(frame.send(f.queue, f.messages.map(message))),
  Confirm: (f) => encode(frame.confirm(f.ids)),
  Refuse: (f) => encode(frame.refuse(f.refusals)),
  Consume: (f) => encode(frame.consume(f.queue, { prefetch: f.prefetch, leaseTtl: f.lease_ttl, maxAttempts: f.max_attempts })),
  Cancel: (f) => encode(frame.cancel(f.queue, { keepLeases: f.keep_leases })),
  Deliver: (f) => encode(frame.deliver(f.queue, f.messages.map(message))),
  Settle: (f) => encode(frame.settle(f.queue, { acks: f.acks, nacks: f.nacks, rejects: f.rejects, extends: f.extends })),
  Request: (f) => encode(frame.request(f.request_id, f.service, message(f.message), f.timeout)),
  Reply: (f) => encode(frame.reply(f.request_id, message(f.message), f.error, f.error_kind)),
  Error: (f) => encode(frame.error(f.reason, { queue: f.queue, ids: f.ids })),
  Batch: (f) => encodeBatch(f.frames.map(bin)),
  Verdict: (f) =>
    encode(frame.verdict(f.verb, f.name, f.allowed, { prefetch: f.prefetch, leaseTtl: f.lease_ttl, reason: f.reason, trimmedTopic: f.trimmed_topic, firstRetained: f.first_retained })),
  Subscribe: (f) =>
    encode(frame.subscribe(f.queue, f.pattern, { policy: f.policy, buffer: f.buffer, fromSeq: f.from_seq, fromTime: f.from_time, last: f.last, lastPerSubject: f.last_per_subject })),
};

// -- checks -----------------------------------------------------------------------

/** Where `got` first differs from `want` (a JSON path and both values), or null. */
function difference(got, want, where = "fields") {
  const show = (v) => (v === undefined ? "nothing" : JSON.stringify(v));
  if (Array.isArray(want)) {
    if (!Array.isArray(got) || got.length !== want.length) return `${where}: got ${show(got)}, want ${show(want)}`;
    for (let i = 0; i < want.length; i++) {
      const d = difference(got[i], want[i], `${where}[${i}]`);
      if (d) return d;
    }
    return null;
  }
  if (want !== null && typeof want === "object") {
    if (got === null || typeof got !== "object" || Array.isArray(got)) return `${where}: got ${show(got)}, want ${show(want)}`;
    for (const key of new Set([...Object.keys(want), ...Object.keys(got)])) {
      const d = difference(got[key], want[key], `${where}.${key}`);
      if (d) return d;
    }
    return null;
  }
  // JSON has one number type, as JavaScript does: 30.0 and 30 are equal
  // here. That they go on the wire as float64 is what the encode check sees.
  return Object.is(got, want) || (got === 0 && want === 0) ? null : `${where}: got ${show(got)}, want ${show(want)}`;
}

/** The first thing wrong with one vector, or null. */
function check(vector, roundTrip) {
  const { frame: type, hex: want, fields } = vector;
  if (!(type in TAG) || !(type in asFields)) return `frame type ${JSON.stringify(type)} is unknown here`;
  if (fields.tag !== TAG[type]) return `fields.tag is ${fields.tag}, but wire.js tags ${type} ${TAG[type]}`;

  let decoded;
  try {
    decoded = decode(Buffer.from(want, "hex"));
  } catch (err) {
    return `decode threw ${err.constructor.name}: ${err.message}`;
  }
  if (decoded.type !== type) return `decoded as ${decoded.type}, want ${type}`;
  const d = difference({ tag: TAG[decoded.type], ...asFields[type](decoded) }, fields);
  if (d) return `decode: ${d}`;

  if (roundTrip) {
    let got;
    try {
      got = hex(encoders[type](fields));
    } catch (err) {
      return `encode threw ${err.constructor.name}: ${err.message}`;
    }
    if (got !== want) return `encode:\n  got  ${got}\n  want ${want}`;
  }
  return null;
}

const doc = JSON.parse(readFileSync(FILE, "utf8"));
if (doc.version !== VERSION) {
  process.stderr.write(`${FILE}: protocol version ${doc.version}, but wire.js speaks ${VERSION}\n`);
  process.exit(1);
}
const all = [
  ...doc.vectors.map((v, i) => ({ vector: v, roundTrip: true, where: `vectors[${i}]` })),
  ...(doc.decode_only ?? []).map((v, i) => ({ vector: v, roundTrip: false, where: `decode_only[${i}]` })),
];
let passed = 0;
for (const { vector, roundTrip, where } of all) {
  const wrong = check(vector, roundTrip);
  if (wrong) {
    process.stderr.write(
      `FAIL: protocol vector ${JSON.stringify(vector.name)} (${where}, ${vector.hex}): ${wrong}\n` +
        `(${passed} of ${all.length} passed before it)\n`,
    );
    process.exit(1);
  }
  passed += 1;
}
const roundTrip = all.filter((v) => v.roundTrip).length;
process.stdout.write(
  `${passed} of ${all.length} protocol vectors passed ` +
    `(${roundTrip} decoded and encoded back, ${passed - roundTrip} decode-only)\n`,
);
process.stdout.write(JSON.stringify({ passed, total: all.length, roundTrip, decodeOnly: passed - roundTrip }) + "\n");
