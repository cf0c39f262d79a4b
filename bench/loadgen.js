#!/usr/bin/env node
// Load generator for bench/bench.py: WebSocket clients on node, built on the
// `ws` package (with its native `bufferutil` masking when installed) and,
// where the load generator's own cost would weigh, on a bare client over
// node's net module (see rawOpen).
//
//   node bench/loadgen.js WORKLOAD --url ws://127.0.0.1:PORT [options]
//
// It writes JSON lines to stdout, which bench.py reads as they come:
//   {"ev":"begin","pids":[...]}   the timed phase starts now (bench.py samples CPU)
//   {"ev":"opened",...}           idle only: every connection is open; it then waits
//                                 for a line on stdin before checking and closing them
//   {"ev":"end",...}              the timed phase is over; the workload's figures
// and exits. Every workload has a deadline (--timeout seconds): past it, it
// reports what it has with "timeout": true and exits.
//
// Workloads (see bench.py for what each measures):
//   rtt        one client (ws), sequential round trips of --size bytes, --count times
//   fanout     --clients clients in one room, one of them (ws) the sender of
//              --messages messages; the receivers (bare clients, or ws with
//              --client ws) live in --procs forked processes
//   big        one client (ws), --count sequential echoes of --size bytes
//   handshake  --count connections (open, upgrade, close), --concurrency at once,
//              with an "anchor" client kept open in the room (--anchor); bare
//              clients, or ws with --client ws
//   idle       open --count connections (ws) to one room, hold them; after "go"
//              on stdin check they are all still open and (--broadcast) that a
//              message reaches every one; --echo: each gets an echo once opened
//   rooms      --count distinct rooms (ws): connect, send, get the echo, close
"use strict";

const { fork } = require("child_process");
const net = require("net");
const { performance } = require("perf_hooks");
const readline = require("readline");
const WebSocket = require("ws");

// Clients do no compression (scalesocket.py has none; the others have it off)
// and skip UTF-8 checks on what they receive, to keep the load generator light.
const WS_OPTS = { perMessageDeflate: false, skipUTF8Validation: true, maxPayload: 64 * 2 ** 20 };

function parseArgs(argv) {
  const opts = {
    workload: argv[0], url: "ws://127.0.0.1:9000", room: "bench", count: 1000, size: 64,
    warmup: 200, clients: 100, messages: 2000, procs: 2, window: 0, concurrency: 16,
    anchor: false, broadcast: false, echo: false, client: "raw", timeout: 60,
  };
  for (let i = 1; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, "");
    if (!(key in opts)) throw new Error(`unknown option ${argv[i]}`);
    if (typeof opts[key] === "boolean") opts[key] = true;
    else if (typeof opts[key] === "number") opts[key] = Number(argv[++i]);
    else opts[key] = argv[++i];
  }
  return opts;
}

const now = () => performance.timeOrigin + performance.now(); // ms, comparable across processes
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

// A payload of `size` ASCII bytes that starts with the sequence number `seq`
// (9 digits), so a receiver can check the order without decoding all of it.
// With `into` (a buffer of the right size), that buffer is reused: only its
// head is rewritten, which spares a 1 MiB allocation per message.
function payload(seq, size, into = null) {
  const head = String(seq).padStart(9, "0");
  if (into) {
    into.write(head, 0, "latin1");
    return into;
  }
  return Buffer.from(head + "x".repeat(Math.max(0, size - head.length)));
}

function seqOf(buf, start = 0) {
  let n = 0;
  for (let i = start; i < start + 9; i++) n = n * 10 + (buf[i] - 48);
  return n;
}

// A promise that rejects if `promise` has not settled within `ms`.
function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function open(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, WS_OPTS);
    ws.once("open", () => resolve(ws));
    ws.once("error", reject);
    ws.once("unexpected-response", (req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
  });
}

function closed(ws) {
  return new Promise((resolve) => {
    if (ws.readyState === WebSocket.CLOSED) return resolve();
    ws.once("close", resolve);
  });
}

const roomUrl = (opts, room) => `${opts.url}/${encodeURIComponent(room)}`;

// rtt and big: one client, one message in flight.
async function sequential(opts, warmup) {
  const ws = await open(roomUrl(opts, opts.room));
  const lat = [];
  let bad = 0;
  let pending = null;
  let timedOut = false;
  ws.on("message", (data) => pending && pending(data));
  ws.on("close", () => pending && pending(null));
  // The deadline covers warm-up and timed phase; a lost echo ends the run then.
  const timer = setTimeout(() => { timedOut = true; if (pending) pending(null); }, opts.timeout * 1000);
  // One message in flight, so one buffer serves them all (ws copies it as it
  // masks it, and the echo is compared before the next message is written).
  const buffer = payload(0, opts.size);
  const roundTrip = (seq) => new Promise((resolve) => {
    const msg = payload(seq, opts.size, buffer);
    pending = (data) => {
      if (data === null || !data.equals(msg)) bad++;
      pending = null;
      resolve(data !== null);
    };
    ws.send(msg, { binary: false });
  });
  for (let i = 0; i < warmup && !timedOut; i++) await roundTrip(i); // also starts the room's child
  emit({ ev: "begin", pids: [process.pid] });
  const t0 = now();
  let done = 0;
  while (done < opts.count && !timedOut) {
    const t = process.hrtime.bigint();
    if (!(await roundTrip(warmup + done))) break;
    lat.push(Number(process.hrtime.bigint() - t) / 1000); // µs
    done++;
  }
  const elapsed = (now() - t0) / 1000;
  clearTimeout(timer);
  lat.sort((a, b) => a - b);
  const pct = (p) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))];
  // "end" before closing: the room's child is still there for bench.py to read.
  emit({
    ev: "end", messages: done, bytes: done * opts.size, elapsed, bad, timeout: done < opts.count,
    msg_per_s: done / elapsed, mb_per_s: done * opts.size / elapsed / 1e6,
    p50_us: pct(0.5), p99_us: pct(0.99), max_us: lat[lat.length - 1],
  });
  ws.close();
  await Promise.race([closed(ws), new Promise((r) => setTimeout(r, 5000))]);
}

// fanout: receivers in forked processes, the sender (also a member) here.
async function fanout(opts) {
  const url = roomUrl(opts, opts.room);
  const nWorkers = Math.max(1, opts.procs);
  const receivers = opts.clients - 1;
  const workers = [];
  for (let w = 0; w < nWorkers; w++) {
    const share = Math.floor(receivers / nWorkers) + (w < receivers % nWorkers ? 1 : 0);
    const child = fork(__filename, ["fanout-worker", "--url", opts.url, "--room", opts.room,
      "--clients", String(share), "--messages", String(opts.messages), "--client", opts.client,
      "--timeout", String(opts.timeout)]);
    workers.push({ child, msgs: [] });
    child.on("message", (m) => workers[w].msgs.push(m));
  }
  const waitFor = (kind, ms) => new Promise((resolve) => {
    const t = setInterval(() => {
      if (workers.every((w) => w.msgs.some((m) => m.kind === kind))) { clearInterval(t); resolve(true); }
      else if (now() > ms) { clearInterval(t); resolve(false); }
    }, 1);
  });
  const deadline = now() + opts.timeout * 1000;
  if (!(await waitFor("ready", deadline))) {
    emit({ ev: "end", error: "receivers did not connect in time", timeout: true });
    workers.forEach((w) => w.child.kill());
    return;
  }
  const sender = await open(url);
  const own = receiverState(opts.messages);
  sender.on("message", (data) => own.receive(data));
  // Every receiver is in the room before the first message: the sender joined last.
  emit({ ev: "begin", pids: [process.pid, ...workers.map((w) => w.child.pid)] });
  const t0 = now();
  const window = opts.window > 0 ? opts.window : opts.messages;
  for (let seq = 0; seq < opts.messages; seq++) {
    while (seq - own.received >= window && now() < deadline) await new Promise((r) => setImmediate(r));
    sender.send(payload(seq, opts.size), { binary: false });
  }
  await own.finished(deadline);
  const ok = await waitFor("done", deadline);
  const results = [own.summary(), ...workers.flatMap((w) => (w.msgs.find((m) => m.kind === "done") || { clients: [] }).clients)];
  // Until the last client had them all; or, if some never did, until now.
  const complete = results.every((r) => r.received >= opts.messages);
  const elapsed = ((complete ? Math.max(...results.map((r) => r.t_last)) : now()) - t0) / 1000;
  const received = results.reduce((s, r) => s + r.received, 0);
  const expected = opts.clients * opts.messages;
  emit({
    ev: "end", clients: results.length, expected, received, lost: expected - received,
    out_of_order: results.reduce((s, r) => s + r.out_of_order, 0),
    closed_early: results.filter((r) => r.closed).length,
    elapsed, deliveries_per_s: received / elapsed, timeout: !ok,
  });
  sender.close();
  workers.forEach((w) => w.child.send({ kind: "exit" }));
  await closed(sender);
}

// One fan-out receiver's bookkeeping: count, order, time of the last message.
function receiverState(expected) {
  const st = { received: 0, next: 0, out_of_order: 0, t_last: 0, closed: false };
  let resolveDone = null;
  st.receive = (data, start = 0) => {
    const seq = seqOf(data, start);
    if (seq !== st.next) st.out_of_order++;
    st.next = seq + 1;
    st.received++;
    if (st.received === expected) { st.t_last = now(); if (resolveDone) resolveDone(); }
  };
  st.finished = (deadline) => new Promise((resolve) => {
    if (st.received >= expected) return resolve();
    resolveDone = resolve;
    setTimeout(resolve, Math.max(0, deadline - now()));
  });
  st.summary = () => ({ received: st.received, out_of_order: st.out_of_order, t_last: st.t_last, closed: st.closed });
  return st;
}

async function fanoutWorker(opts) {
  const url = roomUrl(opts, opts.room);
  const deadline = now() + opts.timeout * 1000;
  const states = [];
  for (let i = 0; i < opts.clients; i++) {
    const st = receiverState(opts.messages);
    if (opts.client === "ws") {
      const ws = await open(url);
      ws.on("message", (data) => st.receive(data));
      ws.on("close", () => { st.closed = true; });
      states.push({ st, close: () => { ws.close(); return closed(ws); } });
    } else {
      const { sock, rest } = await rawOpen(url);
      const parse = frameParser((opcode, buf, start) => {
        if (opcode === 1) st.receive(buf, start);
        else if (opcode === 8) st.closed = true;
      });
      sock.on("data", parse);
      sock.on("error", () => {});
      sock.on("close", () => { st.closed = true; });
      if (rest.length) parse(rest);
      states.push({ st, close: () => new Promise((r) => { sock.once("close", r); sock.end(CLOSE_1000); }) });
    }
  }
  process.on("message", (m) => {
    if (m.kind === "exit") {
      Promise.all(states.map(({ close }) => close())).then(() => process.exit(0));
      setTimeout(() => process.exit(0), 5000).unref();
    }
  });
  process.send({ kind: "ready" });
  await Promise.all(states.map(({ st }) => st.finished(deadline)));
  process.send({ kind: "done", clients: states.map(({ st }) => st.summary()) });
  setTimeout(() => process.exit(1), opts.timeout * 1000).unref(); // the parent vanished
}

// A bare WebSocket client on node's net module, for the workloads where the
// load generator's own cost per connection or per message matters: it does
// the same work on the wire as ws (the same request, a checked 101, masked
// frames out) but skips ws's http-module handshake and per-message events,
// so it costs the load generator a fraction of the CPU. That matters when
// the server and the load generator share two cores. --client ws uses ws.
const HS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="; // RFC 6455's example key...
const HS_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="; // ...and its accept value
const CLOSE_1000 = Buffer.from([0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xe8 ^ 2]); // masked close, code 1000

// Connect and upgrade; resolves to the socket and the bytes after the 101.
function rawOpen(url) {
  const { hostname, port, pathname } = new URL(url);
  const request = `GET ${pathname} HTTP/1.1\r\nHost: ${hostname}:${port}\r\nUpgrade: websocket\r\n` +
    `Connection: Upgrade\r\nSec-WebSocket-Key: ${HS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n`;
  return new Promise((resolve, reject) => {
    const sock = net.connect(Number(port), hostname);
    sock.setNoDelay(true);
    let buf = Buffer.alloc(0);
    const onData = (data) => {
      buf = Buffer.concat([buf, data]);
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      const head = buf.subarray(0, end).toString("latin1");
      sock.removeListener("data", onData);
      sock.removeListener("close", onClose);
      if (!head.startsWith("HTTP/1.1 101") || !head.includes(HS_ACCEPT)) {
        sock.destroy();
        return reject(new Error(head.split("\r\n")[0]));
      }
      resolve({ sock, rest: buf.subarray(end + 4) });
    };
    const onClose = () => reject(new Error("closed before the upgrade"));
    sock.on("connect", () => sock.write(request));
    sock.on("data", onData);
    sock.on("error", reject);
    sock.on("close", onClose);
  });
}

// A parser of server frames (unmasked, unfragmented, as all three servers
// send them): calls onFrame(opcode, buffer, start, length) for each.
function frameParser(onFrame) {
  let buf = null;
  return (chunk) => {
    buf = buf ? Buffer.concat([buf, chunk]) : chunk;
    let off = 0;
    while (buf.length - off >= 2) {
      let len = buf[off + 1] & 0x7f, head = 2;
      if (len === 126) {
        if (buf.length - off < 4) break;
        len = buf.readUInt16BE(off + 2); head = 4;
      } else if (len === 127) {
        if (buf.length - off < 10) break;
        len = Number(buf.readBigUInt64BE(off + 2)); head = 10;
      }
      if (buf.length - off < head + len) break;
      onFrame(buf[off] & 0x0f, buf, off + head, len);
      off += head + len;
    }
    buf = off < buf.length ? buf.subarray(off) : null;
  };
}

// Open, upgrade, send a close frame, wait for the server's, end the socket
// (as ws does once both close frames have passed), wait until it is closed.
async function rawHandshake(url) {
  const { sock, rest } = await rawOpen(url);
  const guard = setTimeout(() => sock.destroy(), 10000); // a server that never closes
  return new Promise((resolve, reject) => {
    let gotClose = false;
    const parse = frameParser((opcode) => { if (opcode === 8 && !gotClose) { gotClose = true; sock.end(); } });
    sock.on("data", parse);
    sock.on("error", () => {});
    sock.on("close", () => {
      clearTimeout(guard);
      if (gotClose) resolve();
      else reject(new Error("no close frame"));
    });
    sock.write(CLOSE_1000);
    if (rest.length) parse(rest);
  });
}

// handshake: open, upgrade, close; --concurrency loops at once.
// Run step(n) for n = 0..count-1 on --concurrency parallel loops until the
// deadline; emit begin, then end with the count done, failures, rate and latency.
async function concurrently(opts, name, step) {
  const deadline = now() + opts.timeout * 1000;
  let started = 0, done = 0, failed = 0;
  const errors = {};
  const lat = [];
  async function loop() {
    while (started < opts.count && now() < deadline) {
      const n = started++;
      const t = now();
      try {
        await withTimeout(step(n), 10000, name); // 10 s for one step at most
        done++;
        lat.push((now() - t) * 1000);
      } catch (e) {
        failed++;
        errors[e.message] = (errors[e.message] || 0) + 1;
      }
    }
  }
  emit({ ev: "begin", pids: [process.pid] });
  const t0 = now();
  await Promise.all(Array.from({ length: opts.concurrency }, loop));
  const elapsed = (now() - t0) / 1000;
  lat.sort((a, b) => a - b);
  return {
    done, failed, errors, elapsed, per_s: done / elapsed, timeout: done + failed < opts.count,
    p50_us: lat[Math.floor(lat.length / 2)], p99_us: lat[Math.floor(lat.length * 0.99)],
  };
}

async function handshake(opts) {
  const url = roomUrl(opts, opts.room);
  const anchor = opts.anchor ? await open(url) : null; // keeps the room's child alive
  if (anchor) { anchor.send("anchor"); await new Promise((r) => anchor.once("message", r)); }
  const connect = opts.client === "ws"
    ? async () => { const ws = await open(url); ws.close(); await closed(ws); }
    : () => rawHandshake(url);
  const { done, ...rest } = await concurrently(opts, "handshake", connect);
  emit({ ev: "end", connections: done, ...rest });
  if (anchor) { anchor.close(); await closed(anchor); }
}

// idle: hold --count connections to one room until told to go on.
async function idle(opts) {
  const url = roomUrl(opts, opts.room);
  const deadline = now() + opts.timeout * 1000;
  const conns = [];
  let failed = 0, closedCount = 0, i = 0;
  const errors = {};
  emit({ ev: "begin", pids: [process.pid] });
  async function loop() {
    while (i < opts.count && now() < deadline) {
      i++;
      try {
        const ws = await open(url);
        ws.on("close", () => closedCount++);
        ws.on("error", () => {});
        if (opts.echo) {
          // Without rooms (websocketd): wait until this connection's own child
          // echoes, so that no more than --concurrency children are starting
          // at once, and each connection counted is served.
          const echoed = new Promise((resolve, reject) => {
            ws.once("message", resolve);
            ws.once("close", () => reject(new Error("closed before the echo")));
          });
          ws.send("hello");
          await withTimeout(echoed, 10000, "echo");
        }
        conns.push(ws);
      } catch (e) {
        failed++;
        errors[e.message] = (errors[e.message] || 0) + 1;
      }
    }
  }
  const t0 = now();
  await Promise.all(Array.from({ length: opts.concurrency }, loop));
  const openElapsed = (now() - t0) / 1000;
  emit({ ev: "opened", opened: conns.length, failed, errors, open_s: openElapsed });
  // bench.py measures the server's memory now, then writes a line.
  const rl = readline.createInterface({ input: process.stdin });
  await new Promise((resolve) => { rl.once("line", resolve); rl.once("close", resolve); setTimeout(resolve, opts.timeout * 1000); });
  rl.close();
  const held = conns.filter((ws) => ws.readyState === WebSocket.OPEN).length;
  let reached = null;
  if (opts.broadcast && conns.length) {
    // One message into the room must reach every connection held.
    reached = 0;
    const all = new Promise((resolve) => {
      conns.forEach((ws) => ws.once("message", () => { if (++reached === conns.length) resolve(); }));
      setTimeout(resolve, 20000);
    });
    conns[0].send("hello everyone");
    await all;
  }
  emit({ ev: "end", requested: opts.count, opened: conns.length, failed, held, closed: closedCount, reached, errors, open_s: openElapsed });
  conns.forEach((ws) => ws.terminate());
}

// rooms: each round opens a room of its own (the server spawns its child).
async function rooms(opts) {
  const tag = `${opts.room}-${process.pid}`;
  const { done, ...rest } = await concurrently(opts, "room", async (n) => {
    const ws = await open(roomUrl(opts, `${tag}-${n}`));
    const msg = `hello ${n}`;
    const echo = new Promise((resolve) => ws.once("message", (d) => resolve(d.toString())));
    ws.send(msg);
    if ((await echo) !== msg) throw new Error("bad echo");
    ws.close();
    await closed(ws);
  });
  emit({ ev: "end", rooms: done, ...rest });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const run = {
    rtt: () => sequential(opts, opts.warmup),
    big: () => sequential(opts, Math.min(opts.warmup, 2)),
    fanout: () => fanout(opts),
    "fanout-worker": () => fanoutWorker(opts),
    handshake: () => handshake(opts),
    idle: () => idle(opts),
    rooms: () => rooms(opts),
  }[opts.workload];
  if (!run) throw new Error(`unknown workload ${opts.workload}`);
  // The whole run is bounded, whatever happens.
  setTimeout(() => {
    if (opts.workload !== "fanout-worker") emit({ ev: "end", error: "hard timeout", timeout: true });
    process.exit(2);
  }, (opts.timeout + 30) * 1000).unref();
  await run();
  if (opts.workload !== "fanout-worker") process.exit(0);
}

main().catch((e) => { emit({ ev: "end", error: String(e && e.stack || e) }); process.exit(1); });
