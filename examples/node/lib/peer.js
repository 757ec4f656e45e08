// One connection to a pigeon node: a DEALER socket whose routing id is our
// node id (docs/protocol.md), Hello on connect and every `heartbeat`
// seconds, and a read loop that hands each decoded frame to `onFrame`.
//
// Why each piece is here:
// - The node knows a peer by its routing id, so it must be unique and
//   stable for the life of the process: a second process with the same id
//   would take over our pipe (ROUTER_HANDOVER).
// - The node declares a peer dead after `heartbeat x 3` seconds without a
//   frame from it, and then takes back every delivery it leased us. A
//   worker busy on a long job sends nothing else, so Hello goes out on a
//   timer whatever the role is doing.
// - zeromq.js allows one send in progress at a time, so sends are chained.

import { randomBytes } from "node:crypto";
import { hostname } from "node:os";
import * as zmq from "zeromq";
import { decodeAll, encode, frame, WireError } from "./wire.js";

export class Peer {
  /**
   * @param {string} url the node's address, e.g. tcp://127.0.0.1:5555
   * @param {object} options role (for the node id), heartbeat (seconds),
   *   onFrame(frame), onReset() (the node restarted or forgot us: send
   *   Consume again, resend what is unconfirmed).
   */
  constructor(url, { role = "node-example", heartbeat = 1.0, onFrame = () => {}, onReset = () => {} } = {}) {
    this.url = url;
    this.nodeId = `${role}-${hostname()}-${process.pid}-${randomBytes(4).toString("hex")}`;
    this.session = randomBytes(8).toString("hex");
    this.heartbeat = heartbeat;
    this.onFrame = onFrame;
    this.onReset = onReset;
    this.remote = null; // the node's last Hello
    this.stats = { framesIn: 0, batches: 0, errors: 0, hellosSent: 0, resets: 0, lastErrors: [] };
    this.sock = new zmq.Dealer({ routingId: this.nodeId, linger: 2000, immediate: true });
    this._chain = Promise.resolve();
    this._helloWaiters = [];
    this._closed = false;
    this._knownSinceReset = false;
  }

  /** Connect, say Hello, and resolve once the node has answered with its own. */
  async start(timeoutSeconds = 30) {
    this.sock.connect(this.url);
    this._readLoop();
    this.sayHello();
    // heartbeat 0: no heartbeats at all, only to show what the node then
    // does (worker.js --heartbeat 0 --hold-first 6: its lease is taken back).
    if (this.heartbeat > 0) this._timer = setInterval(() => this.sayHello(), this.heartbeat * 1000);
    await this.waitHello(timeoutSeconds);
  }

  waitHello(timeoutSeconds) {
    if (this.remote) return Promise.resolve(this.remote);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`no Hello from the node at ${this.url} within ${timeoutSeconds} s`)),
        timeoutSeconds * 1000,
      );
      this._helloWaiters.push((hello) => {
        clearTimeout(timer);
        resolve(hello);
      });
    });
  }

  sayHello() {
    this.stats.hellosSent += 1;
    this.send(frame.hello({ node: this.nodeId, session: this.session, heartbeat: this.heartbeat }));
  }

  /** Queue one frame (a builder's array) for sending, in order. */
  send(array) {
    const bytes = encode(array);
    this._chain = this._chain
      .then(() => (this._closed ? undefined : this.sock.send(bytes)))
      .catch((err) => {
        if (!this._closed) process.stderr.write(`send failed: ${err.message}\n`);
      });
    return this._chain;
  }

  async _readLoop() {
    try {
      for await (const parts of this.sock) {
        if (parts.length !== 1) continue; // pigeon frames are single-part
        let frames;
        try {
          frames = decodeAll(parts[0]);
        } catch (err) {
          if (!(err instanceof WireError)) throw err;
          this._error(`undecodable frame from the node: ${err.message}`);
          continue;
        }
        if (frames.batched) this.stats.batches += 1;
        for (const f of frames) {
          this.stats.framesIn += 1;
          if (f.type === "Hello") this._onHello(f);
          else if (f.type === "Error") this._error(`the node refused a frame of ours: ${f.reason}`);
          this.onFrame(f);
        }
      }
    } catch (err) {
      if (!this._closed) process.stderr.write(`read loop ended: ${err.message}\n`);
    }
  }

  _error(text) {
    this.stats.errors += 1;
    if (this.stats.lastErrors.length < 10) this.stats.lastErrors.push(text);
    process.stderr.write(text + "\n");
  }

  _onHello(hello) {
    const first = this.remote === null;
    const restarted = !first && hello.session !== this.remote.session;
    this.remote = hello;
    if (this.heartbeat > 0 && hello.heartbeat > 0 && hello.heartbeat < this.heartbeat) {
      // The node beats faster than we do (and may judge us by its own
      // interval): keep up with it.
      this.heartbeat = hello.heartbeat;
      clearInterval(this._timer);
      this._timer = setInterval(() => this.sayHello(), this.heartbeat * 1000);
    }
    // A node answers the first frame of a peer it does not know with a
    // Hello whose knows_you is false. At our first contact that is
    // expected (we have registered nothing yet); after that it means the
    // node forgot us (missed heartbeats) and we must register again.
    const forgotten = !hello.knowsYou && this._knownSinceReset;
    if (hello.knowsYou) this._knownSinceReset = true;
    if (restarted || forgotten) {
      this._knownSinceReset = hello.knowsYou;
      this.stats.resets += 1;
      this.onReset();
    }
    if (first) for (const wake of this._helloWaiters.splice(0)) wake(hello);
  }

  async close() {
    clearInterval(this._timer);
    await this._chain;
    this._closed = true;
    this.sock.close(); // linger lets the last frames (acks, Cancel) leave
  }
}

/** Minimal `--name value` argument parsing for the example scripts. */
export function parseArgs(argv, defaults) {
  const out = { ...defaults };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith("--")) throw new Error(`unexpected argument ${arg}`);
    const key = arg.slice(2).replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    if (!(key in defaults)) throw new Error(`unknown option ${arg}`);
    const value = argv[++i];
    if (value === undefined) throw new Error(`${arg} needs a value`);
    if (Array.isArray(defaults[key])) out[key] = [...out[key], value];
    else if (typeof defaults[key] === "number") out[key] = Number(value);
    else out[key] = value;
  }
  if (!out.url) throw new Error("--url tcp://HOST:PORT is required");
  return out;
}

export const sleep = (seconds) => new Promise((resolve) => setTimeout(resolve, seconds * 1000));
