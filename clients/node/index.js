// Spindle from inside an app: start, stop and watch services of a node over
// its control socket (docs/control-protocol.md). No dependencies.
//
//   const { connect } = require('spindle');
//   const pm = await connect({ owned: true });   // or { home, bin }
//   const ids = await pm.start({ name: 'api', script: 'server.js', restartAt: [100, 500, '1s'] });
//   const procs = await pm.list();
//   for await (const line of pm.logs('api', { follow: true })) console.log(line.line);
//   await pm.stop('api'); await pm.close();
//
// Owned mode (`owned: true`): the app owns a private node (a home of its
// own by default). When the app's process ends for any reason — exit, an
// uncaught exception, a signal, SIGKILL — the node stops every service
// (the stopping message or stop signal, then after its grace the whole
// tree is killed) and exits; the next start of the app finds nothing left.
//
// A process on the bus that wants requests and responses uses
// `require('spindle/process')` instead (its IPC channel).
'use strict';

const net = require('net');
const fs = require('fs');
const os = require('os');
const path = require('path');
const crypto = require('crypto');
const { spawn } = require('child_process');
const { EventEmitter } = require('events');

const PROTOCOL = 1;
const VERSION = require('./package.json').version;
// How long a daemon that was just started may take to answer.
const START_DEADLINE_MS = 10_000;
// How long an owned node's leftover daemon may take to stop (its grace).
const LEFTOVER_DEADLINE_MS = 120_000;
// Frames read ahead of the reader (a slow log follower): past it the socket
// is paused, so the daemon's own gap reporting takes over.
const READ_AHEAD = 1024;

/** An error the daemon answered (`kind`: `invalid_spec`, `not_found`, …)
 *  or one of the client's own (`kind`: `bad_option`, `no_daemon`). */
class SpindleError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

// Options in the seed's spelling, and the manifest key each is.
const KEYS = {
  name: 'name', command: 'command', args: 'args', wasm: 'wasm', package: 'package',
  public: 'public', ipc: 'ipc', heartbeat: 'heartbeat', cwd: 'cwd', env: 'env',
  log: 'log', errLog: 'err_log', restartAt: 'restart_at', restartOk: 'restart_ok',
  onExit: 'on_exit', grace: 'grace', stopSignal: 'stop_signal', stripANSI: 'strip_ansi',
  timestamps: 'timestamps', maxMemory: 'max_memory', logMaxSize: 'log_max_size',
  logKeep: 'log_keep', maxChildren: 'max_children', mailboxSize: 'mailbox_size',
};
// Options whose numbers are milliseconds (strings are durations, e.g. '1s').
const DURATIONS = new Set(['heartbeat', 'restartOk', 'grace']);

function duration(key, v) {
  if (typeof v === 'number') {
    if (!Number.isInteger(v) || v < 0) {
      throw new SpindleError('bad_option', `option \`${key}\`: ${v} is not a whole number of milliseconds`);
    }
    return `${v}ms`;
  }
  if (typeof v === 'string') return v;
  throw new SpindleError('bad_option', `option \`${key}\`: give milliseconds or a duration such as '1s'`);
}

// The command that runs `script`: Node for JavaScript (inside Electron the
// app's own binary as Node, as `fork` does), python3 for Python, else the
// script itself.
function scriptCommand(script, env) {
  if (/\.(c|m)?js$/.test(script)) {
    if (process.versions.electron) env.ELECTRON_RUN_AS_NODE = '1';
    return [process.execPath, [script]];
  }
  if (script.endsWith('.py')) return ['python3', [script]];
  return [script, []];
}

/** A start's options as the manifest entry the daemon checks. */
function entry(opts) {
  if (opts === null || typeof opts !== 'object' || Array.isArray(opts)) {
    throw new SpindleError('bad_option', 'start takes an object of options, e.g. { name, script }');
  }
  const raw = {};
  const env = { ...(opts.env || {}) };
  for (const [k, v] of Object.entries(opts)) {
    if (v === undefined || k === 'script' || k === 'env') continue;
    const key = KEYS[k];
    if (!key) {
      throw new SpindleError('bad_option',
        `unknown option \`${k}\`: known options are script, ${Object.keys(KEYS).join(', ')}`);
    }
    if (DURATIONS.has(k)) raw[key] = duration(k, v);
    else if (k === 'restartAt') {
      if (!Array.isArray(v)) throw new SpindleError('bad_option', 'option `restartAt`: give a list, e.g. [100, 500, \'1s\']');
      raw[key] = v.map((d) => (d === 0 ? 0 : duration('restartAt', d)));
    } else if (k === 'maxMemory' || k === 'logMaxSize' || k === 'mailboxSize') {
      raw[key] = typeof v === 'number' ? String(v) : v;
    } else raw[key] = v;
  }
  if (opts.script !== undefined) {
    if (opts.command !== undefined || opts.wasm !== undefined) {
      throw new SpindleError('bad_option', 'give one of `script`, `command` and `wasm`');
    }
    const [command, first] = scriptCommand(String(opts.script), env);
    raw.command = command;
    raw.args = [...first, ...(opts.args || [])];
  }
  raw.env = env;
  return raw;
}

function selector(target) {
  if (target === 'all') return 'all';
  if (typeof target === 'number') return { id: target };
  if (typeof target === 'string' && /^\d+$/.test(target)) return { id: Number(target) };
  if (typeof target === 'string') return { name: target };
  throw new SpindleError('bad_option', 'name a process by its name, its id, or \'all\'');
}

/** One connection to the daemon: frames are lines of JSON, one request at
 *  a time, each answered in order. */
class Connection {
  constructor(socket) {
    this.socket = socket;
    this.buffer = '';
    this.lines = [];
    this.waiters = [];
    this.ended = null;
    socket.setEncoding('utf8');
    socket.on('data', (chunk) => {
      this.buffer += chunk;
      let at;
      while ((at = this.buffer.indexOf('\n')) >= 0) {
        const line = this.buffer.slice(0, at);
        this.buffer = this.buffer.slice(at + 1);
        this.push(JSON.parse(line));
      }
    });
    const end = (e) => {
      this.ended = e || new SpindleError('no_daemon', 'the daemon closed the connection');
      for (const w of this.waiters.splice(0)) w.reject(this.ended);
    };
    socket.on('error', end);
    socket.on('close', () => end());
  }

  push(frame) {
    const w = this.waiters.shift();
    if (w) w.resolve(frame);
    else if (this.lines.push(frame) >= READ_AHEAD) this.socket.pause();
  }

  next() {
    if (this.lines.length) {
      const frame = this.lines.shift();
      if (this.lines.length < READ_AHEAD / 2) this.socket.resume();
      return Promise.resolve(frame);
    }
    if (this.ended) return Promise.reject(this.ended);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  write(req) {
    this.socket.write(JSON.stringify(req) + '\n');
  }

  static open(socketPath) {
    return new Promise((resolve, reject) => {
      const s = net.createConnection(socketPath);
      s.once('connect', async () => {
        s.removeListener('error', reject);
        const c = new Connection(s);
        c.write({ op: 'hello', protocol: PROTOCOL, version: VERSION });
        try {
          const hello = await c.next();
          if (hello.type === 'error') throw new SpindleError(hello.kind, hello.message);
          c.pid = hello.pid;
          c.owner = hello.owner;
          resolve(c);
        } catch (e) {
          s.destroy();
          reject(e);
        }
      });
      s.once('error', reject);
    });
  }

  close() {
    this.socket.end();
    this.socket.destroy();
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return e.code === 'EPERM';
  }
}

function defaultHome(owned) {
  if (!owned) return process.env.SPINDLE_HOME || path.join(os.homedir(), '.spindle');
  // A home of the app's own: named by its main script, so two apps never share one.
  const main = (require.main && require.main.filename) || process.argv[1] || 'app';
  const tag = crypto.createHash('sha256').update(path.resolve(main)).digest('hex').slice(0, 12);
  const name = path.basename(main).replace(/[^A-Za-z0-9_.-]/g, '_');
  return path.join(os.homedir(), '.spindle', 'owned', `${name}-${tag}`);
}

async function tryOpen(sock) {
  try {
    return await Connection.open(sock);
  } catch (e) {
    if (e.code === 'ENOENT' || e.code === 'ECONNREFUSED') return null;
    throw e;
  }
}

// Starts `bin daemon run` for `home`, detached, and waits for it to answer.
async function startDaemon(bin, home, owner) {
  fs.mkdirSync(home, { recursive: true, mode: 0o700 });
  const log = fs.openSync(path.join(home, 'daemon.log'), 'a');
  const args = ['--home', home, 'daemon', 'run'];
  if (owner) args.push('--owner', String(process.pid));
  const env = { ...process.env, SPINDLE_HOME: home };
  delete env.SPINDLE_TAG;
  delete env.SPINDLE_ID;
  const child = spawn(bin, args, { detached: true, stdio: ['ignore', log, log], cwd: '/', env });
  fs.closeSync(log);
  let failed = null;
  child.once('error', (e) => { failed = e; });
  child.once('exit', (code, signal) => { failed = failed || new Error(`it exited with ${signal || code}`); });
  child.unref();
  const sock = path.join(home, 'spindle.sock');
  const end = Date.now() + START_DEADLINE_MS;
  for (;;) {
    const c = await tryOpen(sock);
    if (c) return c;
    if (failed) {
      // Another daemon may have won the race for the home.
      const again = await tryOpen(sock);
      if (again) return again;
      throw new SpindleError('no_daemon',
        `the daemon did not start (${bin}): ${failed.message}; see ${path.join(home, 'daemon.log')}`);
    }
    if (Date.now() > end) {
      throw new SpindleError('no_daemon', `the daemon did not answer within ${START_DEADLINE_MS / 1000}s; see ${path.join(home, 'daemon.log')}`);
    }
    await sleep(2);
  }
}

// A lifecycle frame as the `event` listeners get it.
function eventOf(f) {
  const exit = f.exit || null;
  const status = exit && exit.status;
  return {
    event: f.event, id: f.id, name: f.name, time: new Date(f.at_ms), pid: f.pid,
    reason: exit ? String(exit.reason).toLowerCase() : undefined,
    code: status && status.code, signal: status && status.signal,
    detail: exit ? exit.detail : undefined, delay: f.delay_ms, exit,
  };
}

/** The services of one node. Emits `event` for every lifecycle change
 *  (started, stopping, exited — with reason, code or signal, and detail such
 *  as "heartbeat lost" —, restarting with its delay, stopped, deleted) once
 *  a listener is added; `await pm.subscribe()` waits until they flow. */
class Manager extends EventEmitter {
  constructor(conn, opts) {
    super();
    this.on('newListener', (what) => {
      if (what === 'event') this.subscribe().catch((e) => this.emit('error', e));
    });
    this.conn = conn;
    this.home = opts.home;
    this.owned = opts.owned;
    this.sock = path.join(opts.home, 'spindle.sock');
    this.queue = Promise.resolve();
    this.followers = new Set();
  }

  // One request at a time on the connection, answered in order.
  call(req) {
    const run = async () => {
      this.conn.write(req);
      const resp = await this.conn.next();
      if (resp.type === 'error') throw new SpindleError(resp.kind, resp.message);
      return resp;
    };
    const p = this.queue.then(run, run);
    this.queue = p.catch(() => {});
    return p;
  }

  /** Starts one service (or a list, all or nothing); resolves with ids. */
  async start(opts, { ifAbsent = false } = {}) {
    const list = Array.isArray(opts) ? opts : [opts];
    const ifAbsentHere = ifAbsent || list.some((o) => o && o.ifAbsent);
    const processes = list.map((o) => {
      const { ifAbsent: _drop, ...rest } = o || {};
      return entry(rest);
    });
    const r = await this.call({ op: 'start_entries', processes, base: process.cwd(), if_absent: ifAbsentHere });
    return r.ids;
  }

  async stop(target) { return (await this.call({ op: 'stop', target: selector(target) })).ids; }
  async restart(target) { return (await this.call({ op: 'restart', target: selector(target) })).ids; }
  async delete(target) { return (await this.call({ op: 'delete', target: selector(target) })).ids; }
  async stopall() { return this.stop('all'); }

  /** Every process: id, name, state, pid, restarts, uptime, lastExit, address, cpu, memory. */
  async list() {
    const r = await this.call({ op: 'list' });
    return r.processes.map((p) => ({
      id: p.id, name: p.name, state: p.state, pid: p.pid, restarts: p.restarts,
      uptime: p.uptime_ms, lastExit: p.last_exit, address: p.address, cpu: p.cpu_percent,
      memory: p.memory_bytes, command: p.command, restartIn: p.restart_in_ms,
    }));
  }

  async status() {
    const r = await this.call({ op: 'status' });
    const { type: _t, ...s } = r;
    return s;
  }

  /** Sends `body` (JSON) to a process and resolves with its response. */
  async send(target, body, { timeout = 5000 } = {}) {
    const r = await this.call({ op: 'send', target, body: JSON.stringify(body), timeout_ms: timeout });
    let parsed = r.body;
    try { parsed = JSON.parse(r.body); } catch (_) { /* not JSON: the text */ }
    return { source: r.source, body: parsed, metadata: r.metadata };
  }

  /** Log lines of `target`, whole, as `{ id, name, stream, line, time }`:
   *  the last `lines` of each, then (with `follow`) new ones as they come. */
  async *logs(target, { follow = false, lines = 10, stream = 'both' } = {}) {
    const conn = await Connection.open(this.sock);
    this.followers.add(conn);
    try {
      conn.write({ op: 'logs', target: selector(target), lines, follow, stream });
      for (;;) {
        let f;
        try { f = await conn.next(); } catch (e) { if (follow) return; throw e; }
        if (f.type === 'error') throw new SpindleError(f.kind, f.message);
        if (f.type === 'log_end') return;
        if (f.type === 'log_line') yield { id: f.id, name: f.name, stream: f.stream, line: f.line, time: new Date() };
        if (f.type === 'log_gap') yield { id: f.id, gap: f.missed, time: new Date() };
      }
    } finally {
      this.followers.delete(conn);
      conn.close();
    }
  }

  /** Starts the event stream (once); resolves when events flow. */
  subscribe() {
    if (this.subscribed) return this.subscribed;
    this.subscribed = (async () => {
      const conn = await Connection.open(this.sock);
      this.followers.add(conn);
      conn.write({ op: 'events' });
      const first = await conn.next();
      if (first.type === 'error') throw new SpindleError(first.kind, first.message);
      (async () => {
        for (;;) {
          let f;
          try { f = await conn.next(); } catch (_) { return; }
          if (f.type === 'event') this.emit('event', eventOf(f));
          else if (f.type === 'event_gap') this.emit('event', { event: 'gap', missed: f.missed, time: new Date() });
        }
      })();
    })();
    return this.subscribed;
  }

  /** Stops every service and the daemon, and waits for it to be gone. */
  async shutdown() {
    await this.call({ op: 'shutdown' });
    await this.close();
  }

  /** Closes the connection. An owned node stays up while this process
   *  lives; it stops with it. */
  async close() {
    for (const f of this.followers) f.close();
    this.conn.close();
  }
}

/** Connects to a node, starting its daemon if none answers.
 *  `{ owned: true }`: a private node that ends with this process.
 *  `home`: the node's home (default `$SPINDLE_HOME` or `~/.spindle`; for an
 *  owned node a home of the app's own). `bin`: the spindle binary
 *  (default `$SPINDLE_BIN`, else `spindle` on the PATH). */
async function connect({ owned = false, home, bin } = {}) {
  home = path.resolve(home || defaultHome(owned));
  bin = bin || process.env.SPINDLE_BIN || 'spindle';
  const sock = path.join(home, 'spindle.sock');
  let conn = await tryOpen(sock);
  if (conn && owned && conn.owner === process.pid) {
    // This process's own node (a second connect): use it.
    return new Manager(conn, { home, owned });
  }
  if (conn && owned && conn.owner && alive(conn.owner)) {
    conn.close();
    throw new SpindleError('owned_elsewhere',
      `the node at ${home} is owned by process ${conn.owner}, another run of this app: give this one a home of its own (connect({ owned: true, home }))`);
  }
  if (conn && owned) {
    // A daemon of an earlier run of this app (its owner is gone, and it is
    // stopping), or one nobody owns: stop it, set and all, so there is
    // never a second set.
    conn.write({ op: 'shutdown' });
    await Promise.race([conn.next().catch(() => {}), sleep(LEFTOVER_DEADLINE_MS)]);
    conn.close();
    const end = Date.now() + LEFTOVER_DEADLINE_MS;
    while (fs.existsSync(sock) && (await tryOpen(sock).then((c) => (c && c.close(), c !== null)))) {
      if (Date.now() > end) throw new SpindleError('no_daemon', `the node at ${home} did not stop`);
      await sleep(5);
    }
    conn = null;
  }
  if (!conn) conn = await startDaemon(bin, home, owned);
  return new Manager(conn, { home, owned });
}

module.exports = { connect, SpindleError };
