// Spindle's client for Node: requests and responses over the IPC channel
// Spindle gives a process started with `ipc = true` (fd 3, the channel Node
// opens for process.send). No dependencies.
//
//   const spindle = require('spindle-client');
//   spindle.onRequest(async (msg) => ({ hello: msg.body }));
//   const reply = await spindle.request('local@db:shop:acme', { get: 1 }, { timeout: 2000 });
//   spindle.onStopping(async () => { await flush(); });
//
// With a watchdog (`heartbeat = "5s"`), heartbeats go out from the event
// loop on their own: a blocked loop stops them, which is the point.
'use strict';

if (typeof process.send !== 'function') {
  throw new Error('no IPC channel: start this process with `spindle start --ipc -- node …`');
}

const address = process.env.SPINDLE_ADDRESS;
const waiting = new Map();
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

/** Sends `body` to `target` and resolves with the response:
 *  `{ body, source, context }`. Rejects with a SendError (`.kind` is
 *  `offline`, `timeout`, `no-capability`, `mailbox-full` or `invalid`). */
function request(target, body, { timeout = 5000, context } = {}) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    waiting.set(id, { resolve, reject });
    send({ type: 'request', target, id, timeout_ms: timeout, body, context });
  });
}

/** Sends `body` to `target`, expecting no response. */
function tell(target, body) {
  send({ type: 'request', target, body });
}

/** `handler(msg)` answers requests: `msg` is `{ id, source, body,
 *  expectsResponse }`; what it returns (or resolves to) is the response. */
function onRequest(handler) {
  requestHandler = handler;
}

/** `handler()` runs when the node asks this process to stop; the process
 *  exits when it returns (or its promise settles). */
function onStopping(handler) {
  stoppingHandler = handler;
}

async function answer(m) {
  let body;
  try {
    body = requestHandler ? await requestHandler({
      id: m.id,
      source: m.source,
      body: m.body,
      expectsResponse: !!m.expects_response,
    }) : undefined;
  } catch (e) {
    body = { error: String(e && e.message || e) };
  }
  if (m.expects_response) {
    send({ type: 'response', id: m.id, body: body === undefined ? null : body });
  }
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
        w.resolve({ body: m.body, source: m.source, context: m.context });
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

module.exports = { address, request, tell, onRequest, onStopping, SendError };
