// Spindle's client for Node: requests and responses over the IPC channel
// Spindle gives a process started with `ipc = true` (fd 3, the channel Node
// opens for process.send). No dependencies.
//
//   const spindle = require('spindle/process');
//   spindle.onRequest(async (msg) => ({ hello: msg.body }));   // or respond(msg, …)
//   const reply = await spindle.request('local@db:shop:acme', { get: 1 }, { timeout: 2000 });
//   spindle.onStopping(async () => { await flush(); });
//
// Capabilities are `{ issuer, params }` (params is text, compared exactly):
// received ones are `msg.capabilities`; attach with `{ capabilities }` on
// `request`/`tell` or by answering `spindle.reply(body, { capabilities })`;
// keep with `saveCapabilities`, list with `capabilities()`, give up with
// `dropCapabilities`. `spawn('worker.wasm', { name })` starts a wasm child.
//
// With a watchdog (`heartbeat = "5s"`), heartbeats go out from the event
// loop on their own: a blocked loop stops them, which is the point.
'use strict';

if (typeof process.send !== 'function') {
  throw new Error('no IPC channel: start this process with `spindle start --ipc -- node …`');
}

const address = process.env.SPINDLE_ADDRESS;
const waiting = new Map();
// Calls to the node (capabilities, spawn), answered by `reply` frames.
const calls = new Map();
let nextId = 1;
let requestHandler = null;
let stoppingHandler = null;

class SendError extends Error {
  constructor(kind, message, target, context) {
    super(`sending to ${target}: ${kind}: ${message}`);
    this.kind = kind;
    this.target = target;
    this.context = context;
  }
}

function send(frame) {
  process.send(frame);
}

// Bytes travel as base64 (a Buffer would otherwise become `{type, data}`);
// anything else as the JSON value it is.
function withBody(frame, body) {
  if (Buffer.isBuffer(body) || body instanceof Uint8Array) {
    frame.body_base64 = Buffer.from(body).toString('base64');
  } else {
    frame.body = body === undefined ? null : body;
  }
  return frame;
}

function bodyOf(m) {
  return m.body_base64 !== undefined ? Buffer.from(m.body_base64, 'base64') : m.body;
}

/** Sends `body` to `target` and resolves with the response:
 *  `{ body, source, context, capabilities }`. Rejects with a SendError
 *  (`.kind` is `offline`, `timeout`, `no-capability`, `mailbox-full` or
 *  `invalid`). */
function request(target, body, { timeout = 5000, context, capabilities } = {}) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    waiting.set(id, { resolve, reject });
    send(withBody({ type: 'request', target, id, timeout_ms: timeout, context, capabilities }, body));
  });
}

/** Sends `body` to `target`, expecting no response. */
function tell(target, body, { capabilities } = {}) {
  send(withBody({ type: 'request', target, capabilities }, body));
}

/** The right to message `address`, as a capability to attach or save. */
function messaging(address) {
  return { issuer: address, params: '"messaging"' };
}

/** A response with more than a body, for a request handler to return. */
class Reply {
  constructor(body, { capabilities, metadata } = {}) {
    this.body = body;
    this.capabilities = capabilities;
    this.metadata = metadata;
  }
}

function reply(body, options) {
  return new Reply(body, options);
}

const answered = new WeakSet();

/** Answers the request `msg` now (from a handler, or later from anywhere);
 *  the handler's own return value is then not sent. */
function respond(msg, body, { capabilities, metadata } = {}) {
  if (answered.has(msg) || !msg.expectsResponse) return;
  answered.add(msg);
  send(withBody({ type: 'response', id: msg.id, capabilities, metadata }, body));
}

function call(frame) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    calls.set(id, { resolve, reject });
    send({ ...frame, id });
  });
}

/** Resolves with the capabilities this process holds. */
async function capabilities() {
  return (await call({ type: 'capabilities' })).capabilities;
}

/** Keeps capabilities that came with messages to this process (durably);
 *  resolves with what it now holds. */
async function saveCapabilities(caps) {
  return (await call({ type: 'save_capabilities', capabilities: caps })).capabilities;
}

async function dropCapabilities(caps) {
  return (await call({ type: 'drop_capabilities', capabilities: caps })).capabilities;
}

/** Starts a wasm child in this process's package (a relative path is from
 *  this process's working directory); resolves with its address, which this
 *  process may message. */
async function spawn(wasm, { name, public: isPublic = false, onExit = 'none', capabilities: caps, grantTo } = {}) {
  const r = await call({
    type: 'spawn', wasm, name, public: isPublic, on_exit: onExit, capabilities: caps, grant_to: grantTo,
  });
  return r.address;
}

/** `handler(msg)` answers requests: `msg` is `{ id, source, body,
 *  metadata, capabilities, expectsResponse }` (a body that is not JSON is a
 *  Buffer); what it returns (or resolves to) is the response, unless it
 *  called `respond(msg, …)` itself. */
function onRequest(handler) {
  requestHandler = handler;
}

/** `handler()` runs when the node asks this process to stop; the process
 *  exits when it returns (or its promise settles). */
function onStopping(handler) {
  stoppingHandler = handler;
}

async function answer(m) {
  const msg = {
    id: m.id,
    source: m.source,
    body: bodyOf(m),
    metadata: m.metadata,
    capabilities: m.capabilities || [],
    expectsResponse: !!m.expects_response,
  };
  let body;
  try {
    body = requestHandler ? await requestHandler(msg) : undefined;
  } catch (e) {
    body = { error: String(e && e.message || e) };
  }
  const r = body instanceof Reply ? body : new Reply(body);
  respond(msg, r.body === undefined ? null : r.body, r);
}

process.on('message', (m) => {
  if (!m || typeof m !== 'object') return;
  switch (m.type) {
    case 'request':
      answer(m);
      break;
    case 'response': {
      const w = waiting.get(m.id);
      if (w) {
        waiting.delete(m.id);
        w.resolve({
          body: bodyOf(m), source: m.source, context: m.context, metadata: m.metadata,
          capabilities: m.capabilities || [],
        });
      }
      break;
    }
    case 'reply': {
      const c = calls.get(m.id);
      if (c) {
        calls.delete(m.id);
        if (m.error !== undefined) c.reject(new Error(m.error));
        else c.resolve(m);
      }
      break;
    }
    case 'error': {
      const w = m.id !== undefined && waiting.get(m.id);
      if (w) {
        waiting.delete(m.id);
        w.reject(new SendError(m.kind, m.message, m.target, m.context));
      } else {
        process.emitWarning(`spindle refused a message: ${m.message}`);
      }
      break;
    }
    case 'stopping':
      Promise.resolve(stoppingHandler && stoppingHandler()).finally(() => process.exit(0));
      break;
    default:
      break;
  }
});

const period = Number(process.env.SPINDLE_HEARTBEAT_MS || 0);
if (period > 0) {
  // Well inside the period, from the event loop: a hung loop misses them.
  setInterval(() => send({ type: 'heartbeat' }), Math.max(100, Math.floor(period / 3))).unref();
}

module.exports = {
  address, request, tell, respond, onRequest, onStopping, SendError, reply, Reply, messaging,
  capabilities, saveCapabilities, dropCapabilities, spawn,
};
