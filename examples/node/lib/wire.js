// pigeon's wire frames (docs/protocol.md, version 1) in JavaScript.
//
// A frame on the wire is one ZeroMQ message part: the version byte 0x01,
// then one msgpack array [tag, field, field, ...]. pigeon decodes with
// msgspec, which is strict about msgpack types, so this module is too:
//
// Rule 1: text fields (ids, names, content types, header names and values,
//   reasons) are msgpack str; bodies and the frames inside a Batch are bin
//   (a Uint8Array here). A str where bin is expected is refused, and the
//   other way round.
// Rule 2: float fields (created_at, deadline, lease_ttl, timeout, nack
//   delays) are always written as float64, even when whole (30.0 stays
//   0xcb ..., never the int 30). JavaScript has one number type, so a float
//   field is wrapped in `f64()` before encoding. msgspec would take an int
//   there too, but other implementations need not.
// Rule 3: int fields (tag, prefetch, attempt, load, max_attempts) are
//   msgpack ints; a non-integer there is an encoding error here.
// Rule 4: decoding reads a frame's fields in order, fills missing trailing
//   fields with their defaults and ignores extra trailing ones (a newer
//   peer may add optional fields at the end, as msgspec allows), and
//   refuses anything of the wrong type with a WireError.
// Rule 5: a Batch holds whole encoded frames (version byte included) as
//   bin, never another Batch.

import { Decoder, Encoder } from "@msgpack/msgpack";
import { randomBytes } from "node:crypto";

export const VERSION = 1;

export const TAG = Object.freeze({
  Hello: 1,
  Send: 2,
  Confirm: 3,
  Refuse: 4,
  Consume: 5,
  Cancel: 6,
  Deliver: 7,
  Settle: 8,
  Request: 9,
  Reply: 10,
  Error: 11,
  Batch: 12,
  Verdict: 13,
  Subscribe: 14,
});
const NAME_OF_TAG = Object.fromEntries(Object.entries(TAG).map(([k, v]) => [v, k]));

// Bounds from pigeon/_core/limits.py (docs/protocol.md, "Limits").
export const LIMITS = Object.freeze({
  MAX_ID: 255, // characters in a message or request id
  MAX_NAME: 255, // bytes in a queue or service name
  MAX_TEXT: 8192,
  MAX_HEADERS: 64,
  MAX_HEADER_NAME: 255,
  MAX_HEADER_VALUE: 8192,
  MAX_TIME: 1e11,
  MAX_SECONDS: 1e9,
  MAX_ATTEMPT: 2 ** 31 - 1,
  MAX_PREFETCH: 100_000,
  MAX_FRAME_ITEMS: 10_000,
  MAX_BATCH_FRAMES: 1024,
});

export const REFUSAL_REASONS = Object.freeze(["full", "too large", "store failed", "forbidden"]);
export const RETRYABLE_REFUSALS = Object.freeze(["full", "store failed"]);
export const ERROR_KINDS = Object.freeze(["", "Rejected", "Timeout", "NoResponders", "Forbidden", "Busy"]);

export const BYTES = "application/octet-stream";
export const TEXT = "text/plain; charset=utf-8";
export const JSON_TYPE = "application/json";
export const MSGPACK = "application/msgpack";

export class WireError extends Error {}

// -- Rule 2: floats ----------------------------------------------------------

/** A number that must go on the wire as float64 (Rule 2). */
export class Float64 {
  constructor(value) {
    this.value = value;
  }
}

export function f64(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) {
    throw new WireError(`a float field needs a finite number, not ${value}`);
  }
  return new Float64(value);
}

// @msgpack/msgpack writes a whole number as an int. Its encoder has no
// per-value float option, so this subclass writes Float64 wrappers with the
// library's own float64 writer (the version is pinned in package.json;
// selftest.js checks that 30.0 comes out as 0xcb).
class WireEncoder extends Encoder {
  doEncode(object, depth) {
    if (object instanceof Float64) {
      this.ensureBufferSizeToWrite(9);
      this.writeU8(0xcb);
      this.writeF64(object.value);
      return;
    }
    super.doEncode(object, depth);
  }
}

const encoder = new WireEncoder();
const decoder = new Decoder();

// -- field checks ------------------------------------------------------------

const NAME_RE = /^[^\s\x00-\x1f\x7f*>.]+(\.[^\s\x00-\x1f\x7f*>.]+)*$/u;

function checkId(id, what = "id") {
  if (typeof id !== "string") throw new WireError(`${what} must be a string, not ${typeof id}`);
  const chars = [...id].length; // pigeon counts characters (code points)
  if (chars < 1 || chars > LIMITS.MAX_ID) {
    throw new WireError(`${what} is 1 to ${LIMITS.MAX_ID} characters, not ${chars}`);
  }
  return id;
}

function checkName(name, what = "name") {
  if (typeof name !== "string") throw new WireError(`a ${what} must be a string`);
  const bytes = Buffer.byteLength(name, "utf8");
  if (bytes < 1 || bytes > LIMITS.MAX_NAME || !NAME_RE.test(name)) {
    throw new WireError(
      `${what} ${JSON.stringify(name)}: 1 to 255 bytes, dot-separated non-empty segments ` +
        "without white space, control characters, '*' or '>'",
    );
  }
  return name;
}

function checkText(text, what, max = LIMITS.MAX_TEXT) {
  if (typeof text !== "string") throw new WireError(`${what} must be a string`);
  if ([...text].length > max) throw new WireError(`${what} is over ${max} characters`);
  return text;
}

function checkInt(n, what, min, max) {
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new WireError(`${what} must be an integer from ${min} to ${max}, not ${n}`);
  }
  return n;
}

function checkSeconds(x, what, max = LIMITS.MAX_SECONDS) {
  if (typeof x !== "number" || !Number.isFinite(x) || x < 0 || x > max) {
    throw new WireError(`${what} must be a finite number from 0 to ${max}, not ${x}`);
  }
  return x;
}

function checkBin(b, what) {
  if (!(b instanceof Uint8Array)) throw new WireError(`${what} must be bytes (msgpack bin)`);
  return b;
}

function checkBool(b, what) {
  if (typeof b !== "boolean") throw new WireError(`${what} must be a bool`);
  return b;
}

function checkList(xs, what, max = LIMITS.MAX_FRAME_ITEMS) {
  if (!Array.isArray(xs)) throw new WireError(`${what} must be an array`);
  if (xs.length > max) throw new WireError(`${what} holds at most ${max} items, not ${xs.length}`);
  return xs;
}

function checkHeaders(headers) {
  if (headers === null || typeof headers !== "object" || Array.isArray(headers)) {
    throw new WireError("headers must be a map of str to str");
  }
  const entries = headers instanceof Map ? [...headers.entries()] : Object.entries(headers);
  if (entries.length > LIMITS.MAX_HEADERS) throw new WireError("at most 64 headers");
  const out = {};
  for (const [key, value] of entries) {
    if (typeof key !== "string" || typeof value !== "string") {
      throw new WireError("headers must map str to str");
    }
    const n = [...key].length;
    if (n < 1 || n > LIMITS.MAX_HEADER_NAME) throw new WireError(`header name ${key}: 1 to 255 characters`);
    checkText(value, `header ${key}`, LIMITS.MAX_HEADER_VALUE);
    out[key] = value;
  }
  return out;
}

// -- ids -----------------------------------------------------------------------

// Same shape as pigeon's own ids (message.py): 12 hex digits of
// milliseconds, a random per-process tag of 10 hex digits, a 32-bit counter
// in 8 hex digits. Any 1-255 character string is a valid id; this one
// sorts by creation time and never repeats within a process.
const PROCESS_TAG = randomBytes(5).toString("hex");
let counter = 0;

export function newId() {
  const ms = Date.now().toString(16).padStart(12, "0");
  counter = (counter + 1) >>> 0;
  return ms + PROCESS_TAG + counter.toString(16).padStart(8, "0");
}

// -- the envelope --------------------------------------------------------------

/**
 * A new message. `body` is a string (sent as UTF-8 text), a Uint8Array
 * (octet-stream) or any other value (JSON), unless `contentType` is given.
 */
export function makeMessage(body, { id, contentType, headers = {}, deadline = null } = {}) {
  let bytes;
  let ctype = contentType;
  if (body instanceof Uint8Array) {
    bytes = body;
    ctype ??= BYTES;
  } else if (typeof body === "string") {
    bytes = new TextEncoder().encode(body);
    ctype ??= TEXT;
  } else {
    bytes = new TextEncoder().encode(JSON.stringify(body));
    ctype ??= JSON_TYPE;
  }
  return {
    id: id ?? newId(),
    body: bytes,
    contentType: ctype,
    headers,
    attempt: 0,
    redelivered: false,
    createdAt: Date.now() / 1000,
    deadline,
  };
}

/** The envelope as the msgpack array of docs/protocol.md ("The envelope"). */
function encodeMessage(m) {
  return [
    checkId(m.id, "message id"),
    checkBin(m.body, "body"),
    checkText(m.contentType ?? BYTES, "content_type", LIMITS.MAX_NAME),
    checkHeaders(m.headers ?? {}),
    checkInt(m.attempt ?? 0, "attempt", 0, LIMITS.MAX_ATTEMPT),
    checkBool(m.redelivered ?? false, "redelivered"),
    f64(checkSeconds(m.createdAt ?? 0, "created_at", LIMITS.MAX_TIME)),
    m.deadline == null ? null : f64(checkSeconds(m.deadline, "deadline", LIMITS.MAX_TIME)),
  ];
}

// Fields after the id have defaults (msgspec's Message defaults).
function decodeMessage(a) {
  if (!Array.isArray(a) || a.length < 2) throw new WireError("a message is an array of at least [id, body]");
  const [id, body, ctype = BYTES, headers = {}, attempt = 0, redelivered = false, createdAt = 0, deadline = null] = a;
  return {
    id: checkId(id, "message id"),
    body: checkBin(body, "body"),
    contentType: checkText(ctype, "content_type", LIMITS.MAX_NAME),
    headers: checkHeaders(headers),
    attempt: checkInt(attempt, "attempt", 0, LIMITS.MAX_ATTEMPT),
    redelivered: checkBool(redelivered, "redelivered"),
    createdAt: checkSeconds(createdAt, "created_at", LIMITS.MAX_TIME),
    deadline: deadline === null ? null : checkSeconds(deadline, "deadline", LIMITS.MAX_TIME),
  };
}

export function messageText(m) {
  return new TextDecoder("utf-8", { fatal: true }).decode(m.body);
}

// -- frames: encoding ------------------------------------------------------------
// Each builder returns the msgpack array (with Float64 wrappers); `encode`
// turns it into the bytes of one ZeroMQ message part.

export const frame = {
  // `heartbeat` (seconds between our Hellos) is a trailing field newer
  // nodes read to size our grace; older ones ignore it (Rule 4).
  hello: ({ node, session, services = [], hostsQueues = false, load = 0, knowsYou = true, heartbeat = null }) => {
    const array = [
      TAG.Hello,
      checkId(node, "node"),
      checkId(session, "session"),
      checkList(services, "services", 1024).map((s) => checkName(s, "service")),
      checkBool(hostsQueues, "hosts_queues"),
      checkInt(load, "load", 0, LIMITS.MAX_ATTEMPT),
      checkBool(knowsYou, "knows_you"),
    ];
    if (heartbeat !== null) array.push(f64(checkSeconds(heartbeat, "heartbeat")));
    return array;
  },
  send: (queue, messages) => [TAG.Send, checkName(queue, "queue"), checkList(messages, "messages").map(encodeMessage)],
  confirm: (ids) => [TAG.Confirm, checkList(ids, "ids").map((id) => checkId(id))],
  refuse: (refusals) => [
    TAG.Refuse,
    checkList(refusals, "refusals").map(([id, reason, detail]) => [checkId(id), checkReason(reason), checkText(detail, "detail")]),
  ],
  consume: (queue, { prefetch, leaseTtl = 30.0, maxAttempts = 0 }) => [
    TAG.Consume,
    checkName(queue, "queue"),
    checkInt(prefetch, "prefetch", 1, LIMITS.MAX_PREFETCH),
    f64(checkSeconds(leaseTtl, "lease_ttl")),
    checkInt(maxAttempts, "max_attempts", 0, LIMITS.MAX_ATTEMPT),
  ],
  cancel: (queue, { keepLeases = false } = {}) => [TAG.Cancel, checkName(queue, "queue"), checkBool(keepLeases, "keep_leases")],
  deliver: (queue, messages) => [TAG.Deliver, checkName(queue, "queue"), checkList(messages, "messages").map(encodeMessage)],
  settle: (queue, { acks = [], nacks = [], rejects = [], extends: ext = [] } = {}) => [
    TAG.Settle,
    checkName(queue, "queue"),
    checkList(acks, "acks").map((id) => checkId(id)),
    checkList(nacks, "nacks").map(([id, delay, reason]) => [checkId(id), f64(checkSeconds(delay, "nack delay")), checkText(reason, "reason")]),
    checkList(rejects, "rejects").map(([id, reason]) => [checkId(id), checkText(reason, "reason")]),
    checkList(ext, "extends").map((id) => checkId(id)),
  ],
  request: (requestId, service, message, timeout) => [
    TAG.Request,
    checkId(requestId, "request_id"),
    checkName(service, "service"),
    encodeMessage(message),
    f64(checkSeconds(timeout, "timeout")),
  ],
  reply: (requestId, message, error = "", errorKind = "") => [
    TAG.Reply,
    checkId(requestId, "request_id"),
    message == null ? null : encodeMessage(message),
    checkText(error, "error"),
    checkErrorKind(errorKind),
  ],
  // queue and ids: what the refused frame concerned ("" and [] when
  // nothing in particular). Always written, as pigeon writes them.
  error: (reason, { queue = "", ids = [] } = {}) => [
    TAG.Error,
    checkText(reason, "reason"),
    checkText(queue, "queue", LIMITS.MAX_NAME),
    checkList(ids, "ids").map((id) => checkId(id)),
  ],
  verdict: (verb, name, allowed, { prefetch = 0, leaseTtl = 0.0, reason = "", trimmedTopic = "", firstRetained = 0 } = {}) => [
    TAG.Verdict,
    checkText(verb, "verb", 16),
    checkName(name),
    checkBool(allowed, "allowed"),
    checkInt(prefetch, "prefetch", 0, LIMITS.MAX_ATTEMPT),
    f64(checkSeconds(leaseTtl, "lease_ttl")),
    checkText(reason, "reason"),
    checkText(trimmedTopic, "trimmed_topic", LIMITS.MAX_NAME),
    checkInt(firstRetained, "first_retained", 0, Number.MAX_SAFE_INTEGER),
  ],
  // A topic subscription: the Consume of `queue` that follows answers it.
  subscribe: (queue, pattern, { policy = "drop-oldest", buffer = 10000, fromSeq = null, fromTime = null, last = null, lastPerSubject = false } = {}) => [
    TAG.Subscribe,
    checkName(queue, "queue"),
    checkText(pattern, "pattern", LIMITS.MAX_NAME),
    checkText(policy, "policy", 16),
    checkInt(buffer, "buffer", 1, 1000000),
    fromSeq === null ? null : checkInt(fromSeq, "from_seq", 1, Number.MAX_SAFE_INTEGER),
    fromTime === null ? null : f64(checkSeconds(fromTime, "from_time", 1e11)),
    last === null ? null : checkInt(last, "last", 1, Number.MAX_SAFE_INTEGER),
    checkBool(lastPerSubject, "last_per_subject"),
  ],
};

function checkReason(reason) {
  if (!REFUSAL_REASONS.includes(reason)) throw new WireError(`unknown refusal reason ${JSON.stringify(reason)}`);
  return reason;
}

function checkErrorKind(kind) {
  if (!ERROR_KINDS.includes(kind)) throw new WireError(`unknown error_kind ${JSON.stringify(kind)}`);
  return kind;
}

/** One frame's bytes: the version byte, then the msgpack array. */
export function encode(array) {
  const body = encoder.encode(array);
  const out = new Uint8Array(body.length + 1);
  out[0] = VERSION;
  out.set(body, 1);
  return out;
}

/** Several already-encoded frames as one Batch frame (Rule 5). */
export function encodeBatch(encodedFrames) {
  checkList(encodedFrames, "frames", LIMITS.MAX_BATCH_FRAMES);
  for (const f of encodedFrames) {
    if (!(f instanceof Uint8Array) || f[0] !== VERSION) throw new WireError("a Batch holds encoded frames");
    if (f[1] === 0x92 && f[2] === TAG.Batch) throw new WireError("a Batch may not hold another Batch");
  }
  return encode([TAG.Batch, encodedFrames]);
}

// -- frames: decoding --------------------------------------------------------------

// Readers by tag: each takes the fields after the tag (Rule 4: missing
// trailing fields get defaults, extra ones are ignored).
const readers = {
  [TAG.Hello]: ([node, session, services = [], hostsQueues = false, load = 0, knowsYou = true, heartbeat = 0]) => ({
    node: checkId(node, "node"),
    session: checkId(session, "session"),
    services: checkList(services, "services", 1024).map((s) => checkName(s, "service")),
    hostsQueues: checkBool(hostsQueues, "hosts_queues"),
    load: checkInt(load, "load", 0, LIMITS.MAX_ATTEMPT),
    knowsYou: checkBool(knowsYou, "knows_you"),
    heartbeat: checkSeconds(heartbeat, "heartbeat"), // 0: not said
  }),
  [TAG.Send]: ([queue, messages]) => ({ queue: checkName(queue), messages: checkList(messages, "messages").map(decodeMessage) }),
  [TAG.Confirm]: ([ids]) => ({ ids: checkList(ids, "ids").map((id) => checkId(id)) }),
  [TAG.Refuse]: ([refusals]) => ({
    refusals: checkList(refusals, "refusals").map((r) => {
      if (!Array.isArray(r) || r.length !== 3) throw new WireError("a refusal is [id, reason, detail]");
      return { id: checkId(r[0]), reason: checkReason(r[1]), detail: checkText(r[2], "detail") };
    }),
  }),
  [TAG.Consume]: ([queue, prefetch, leaseTtl = 30.0, maxAttempts = 0]) => ({
    queue: checkName(queue),
    prefetch: checkInt(prefetch, "prefetch", 1, LIMITS.MAX_PREFETCH),
    leaseTtl: checkSeconds(leaseTtl, "lease_ttl"),
    maxAttempts: checkInt(maxAttempts, "max_attempts", 0, LIMITS.MAX_ATTEMPT),
  }),
  [TAG.Cancel]: ([queue, keepLeases = false]) => ({ queue: checkName(queue), keepLeases: checkBool(keepLeases, "keep_leases") }),
  [TAG.Deliver]: ([queue, messages]) => ({ queue: checkName(queue), messages: checkList(messages, "messages").map(decodeMessage) }),
  [TAG.Settle]: ([queue, acks = [], nacks = [], rejects = [], ext = []]) => ({
    queue: checkName(queue),
    acks: checkList(acks, "acks").map((id) => checkId(id)),
    nacks: checkList(nacks, "nacks").map(([id, delay, reason]) => ({ id: checkId(id), delay: checkSeconds(delay, "delay"), reason: checkText(reason, "reason") })),
    rejects: checkList(rejects, "rejects").map(([id, reason]) => ({ id: checkId(id), reason: checkText(reason, "reason") })),
    extends: checkList(ext, "extends").map((id) => checkId(id)),
  }),
  [TAG.Request]: ([requestId, service, message, timeout]) => ({
    requestId: checkId(requestId, "request_id"),
    service: checkName(service, "service"),
    message: decodeMessage(message),
    timeout: checkSeconds(timeout, "timeout"),
  }),
  [TAG.Reply]: ([requestId, message = null, error = "", errorKind = ""]) => ({
    requestId: checkId(requestId, "request_id"),
    message: message === null ? null : decodeMessage(message),
    error: checkText(error, "error"),
    errorKind: checkErrorKind(errorKind),
  }),
  // queue and ids: what the refused frame concerned, when newer nodes say.
  [TAG.Error]: ([reason, queue = "", ids = []]) => ({
    reason: checkText(reason, "reason"),
    queue: checkText(queue, "queue", LIMITS.MAX_NAME),
    ids: checkList(ids, "ids").map((id) => checkId(id)),
  }),
  [TAG.Batch]: ([frames]) => ({ frames: checkList(frames, "frames", LIMITS.MAX_BATCH_FRAMES).map((f) => checkBin(f, "a Batch item")) }),
  [TAG.Verdict]: ([verb, name, allowed, prefetch = 0, leaseTtl = 0.0, reason = "", trimmedTopic = "", firstRetained = 0]) => ({
    verb: checkText(verb, "verb", 16),
    name: checkName(name),
    allowed: checkBool(allowed, "allowed"),
    prefetch: checkInt(prefetch, "prefetch", 0, LIMITS.MAX_ATTEMPT),
    leaseTtl: checkSeconds(leaseTtl, "lease_ttl"),
    reason: checkText(reason, "reason"),
    trimmedTopic: checkText(trimmedTopic, "trimmed_topic", LIMITS.MAX_NAME),
    firstRetained: checkInt(firstRetained, "first_retained", 0, Number.MAX_SAFE_INTEGER),
  }),
  [TAG.Subscribe]: ([queue, pattern, policy = "drop-oldest", buffer = 10000, fromSeq = null, fromTime = null, last = null, lastPerSubject = false]) => ({
    queue: checkName(queue, "queue"),
    pattern: checkText(pattern, "pattern", LIMITS.MAX_NAME),
    policy: checkText(policy, "policy", 16),
    buffer: checkInt(buffer, "buffer", 1, 1000000),
    fromSeq: fromSeq === null ? null : checkInt(fromSeq, "from_seq", 1, Number.MAX_SAFE_INTEGER),
    fromTime: fromTime === null ? null : checkSeconds(fromTime, "from_time", 1e11),
    last: last === null ? null : checkInt(last, "last", 1, Number.MAX_SAFE_INTEGER),
    lastPerSubject: checkBool(lastPerSubject, "last_per_subject"),
  }),
};

/** Decode one frame: `{type, ...fields}`. Throws WireError on anything malformed. */
export function decode(data) {
  if (!data || data.length === 0) throw new WireError("empty frame");
  if (data[0] !== VERSION) throw new WireError(`unknown protocol version ${data[0]} (this speaks ${VERSION})`);
  let array;
  try {
    array = decoder.decode(data.subarray(1));
  } catch (err) {
    throw new WireError(`not msgpack: ${err.message}`);
  }
  if (!Array.isArray(array) || array.length < 1) throw new WireError("a frame is a msgpack array [tag, ...]");
  const [tag, ...fields] = array;
  const read = readers[tag];
  if (!Number.isInteger(tag) || read === undefined) throw new WireError(`unknown frame tag ${tag}`);
  try {
    return { type: NAME_OF_TAG[tag], ...read(fields) };
  } catch (err) {
    if (err instanceof WireError) throw new WireError(`malformed ${NAME_OF_TAG[tag]}: ${err.message}`);
    throw new WireError(`malformed ${NAME_OF_TAG[tag]}: ${err.message}`);
  }
}

/** Decode one ZeroMQ message: a frame, or the frames of a Batch (Rule 5);
 * the array's `batched` says which. */
export function decodeAll(data) {
  const f = decode(data);
  if (f.type !== "Batch") return Object.assign([f], { batched: false });
  const inner = f.frames.map(decode);
  if (inner.some((g) => g.type === "Batch")) throw new WireError("a Batch frame may not hold another Batch");
  return Object.assign(inner, { batched: true });
}
