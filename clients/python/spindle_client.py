"""Spindle's client for Python: requests and responses on the message bus,
for a process started with ``spindle start --ipc -- python3 app.py``.

One file, standard library only. Spindle hands the process one end of a
socket as fd ``NODE_CHANNEL_FD`` (3); frames are one JSON object per line.

Blocking::

    from spindle_client import Spindle
    node = Spindle()
    reply = node.request("local@db:shop:acme", {"get": 1}, timeout=2.0)
    node.serve(lambda msg: {"hello": msg.body})   # answers until stopped

asyncio::

    from spindle_client import AsyncSpindle
    node = await AsyncSpindle.connect()
    reply = await node.request("local@db:shop:acme", {"get": 1})
    await node.serve(handler)                        # handler may be async

Capabilities are ``{"issuer": address, "params": text}`` dicts (params is
compared exactly): received ones are ``msg.capabilities``; attach them with
``capabilities=`` on ``request``/``tell``/``respond`` (or return
``Reply(body, capabilities=…)`` from a handler); keep them with
``save_capabilities``, list with ``capabilities()``, give up with
``drop_capabilities``. ``spawn("worker.wasm", name=…)`` starts a wasm child.

With a watchdog (``heartbeat = "5s"``) heartbeats are sent on their own: by
a thread in the blocking client, by a task in the asyncio one (so a blocked
event loop stops them, which is the point).
"""

import asyncio
import base64
import itertools
import json
import os
import socket
import sys
import threading
import time

__all__ = ["Spindle", "AsyncSpindle", "Message", "Reply", "SendError", "CallError", "messaging"]


class SendError(Exception):
    """A request that got no response: ``kind`` is ``offline``, ``timeout``,
    ``no-capability``, ``mailbox-full`` or ``invalid``."""

    def __init__(self, kind, message, target=None, context=None):
        super().__init__(f"sending to {target}: {kind}: {message}")
        self.kind = kind
        self.target = target
        self.context = context


class CallError(Exception):
    """A call to the node (capabilities, spawn) that failed; the text says why."""


def messaging(address):
    """The right to message ``address``, as a capability to attach or save."""
    return {"issuer": address, "params": '"messaging"'}


class Reply:
    """A response with more than a body, for a handler to return."""

    def __init__(self, body=None, capabilities=None, metadata=None):
        self.body = body
        self.capabilities = capabilities
        self.metadata = metadata


class Message:
    """A request or response that arrived."""

    def __init__(self, frame):
        self.type = frame.get("type")
        self.id = frame.get("id")
        self.source = frame.get("source")
        self.expects_response = bool(frame.get("expects_response"))
        self.context = frame.get("context")
        self.metadata = frame.get("metadata")
        self.capabilities = frame.get("capabilities") or []
        if "body_base64" in frame:
            self.body = base64.b64decode(frame["body_base64"])
        else:
            self.body = frame.get("body")

    def __repr__(self):
        return f"Message({self.type} {self.id} from {self.source}: {self.body!r})"


def _channel_fd():
    fd = os.environ.get("NODE_CHANNEL_FD")
    if fd is None:
        raise RuntimeError(
            "no IPC channel: start this process with `spindle start --ipc -- python3 ...`"
        )
    return int(fd)


def _encode(frame):
    return (json.dumps(frame, separators=(",", ":")) + "\n").encode()


def _body_fields(body):
    if isinstance(body, (bytes, bytearray)):
        return {"body_base64": base64.b64encode(bytes(body)).decode()}
    return {"body": body}


def _message_fields(body, capabilities=None, metadata=None):
    if isinstance(body, Reply):
        body, capabilities, metadata = body.body, body.capabilities, body.metadata
    fields = _body_fields(body)
    if capabilities:
        fields["capabilities"] = list(capabilities)
    if metadata is not None:
        fields["metadata"] = metadata
    return fields


def _call_frame(kind, **fields):
    frame = {"type": kind}
    frame.update({k: v for k, v in fields.items() if v is not None})
    return frame


def _spawn_frame(wasm, name, public, on_exit, capabilities, grant_to):
    return _call_frame("spawn", wasm=wasm, name=name, public=public, on_exit=on_exit,
                       capabilities=capabilities, grant_to=grant_to)


def _answer(reply):
    if "error" in reply:
        raise CallError(reply["error"])
    return reply


def _heartbeat_period():
    ms = int(os.environ.get("SPINDLE_HEARTBEAT_MS", "0") or 0)
    return max(0.1, ms / 3000) if ms > 0 else None


class Spindle:
    """The blocking client."""

    def __init__(self):
        self.address = os.environ.get("SPINDLE_ADDRESS")
        self._sock = socket.socket(fileno=_channel_fd())
        self._reader = self._sock.makefile("rb")
        self._write_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._queued = []
        period = _heartbeat_period()
        if period:
            threading.Thread(target=self._beat, args=(period,), daemon=True).start()

    def _beat(self, period):
        while True:
            time.sleep(period)
            try:
                self._send({"type": "heartbeat"})
            except OSError:
                return

    def _send(self, frame):
        data = _encode(frame)
        with self._write_lock:
            self._sock.sendall(data)

    def _next_frame(self):
        line = self._reader.readline()
        if not line:
            raise EOFError("the node closed the channel")
        return json.loads(line)

    def _await(self, rid, types):
        """Reads until a frame of ``types`` with id ``rid``; others wait for
        ``receive``/``serve``."""
        while True:
            f = self._next_frame()
            if f.get("id") == rid and f.get("type") in types:
                return f
            self._queued.append(f)

    def request(self, target, body=None, timeout=5.0, context=None, capabilities=None):
        """Sends and waits for the response (a ``Message``); other messages
        arriving meanwhile wait for ``receive``/``serve``."""
        rid = next(self._ids)
        frame = {"type": "request", "target": target, "id": rid,
                 "timeout_ms": int(timeout * 1000), "context": context}
        frame.update(_message_fields(body, capabilities))
        self._send(frame)
        f = self._await(rid, ("response", "error"))
        if f.get("type") == "error":
            raise SendError(f.get("kind"), f.get("message"), f.get("target"), f.get("context"))
        return Message(f)

    def tell(self, target, body=None, capabilities=None):
        """Sends a request that expects no response."""
        frame = {"type": "request", "target": target}
        frame.update(_message_fields(body, capabilities))
        self._send(frame)

    def respond(self, msg, body=None, capabilities=None):
        frame = {"type": "response", "id": msg.id}
        frame.update(_message_fields(body, capabilities))
        self._send(frame)

    def _call(self, frame):
        rid = next(self._ids)
        frame["id"] = rid
        self._send(frame)
        return _answer(self._await(rid, ("reply",)))

    def capabilities(self):
        """The capabilities this process holds."""
        return self._call(_call_frame("capabilities"))["capabilities"]

    def save_capabilities(self, caps):
        """Keeps capabilities that came with messages to this process
        (durably); returns what it now holds."""
        return self._call(_call_frame("save_capabilities", capabilities=list(caps)))["capabilities"]

    def drop_capabilities(self, caps):
        return self._call(_call_frame("drop_capabilities", capabilities=list(caps)))["capabilities"]

    def spawn(self, wasm, name=None, public=False, on_exit="none", capabilities=None, grant_to=None):
        """Starts a wasm child in this process's package; returns its address."""
        return self._call(_spawn_frame(wasm, name, public, on_exit, capabilities, grant_to))["address"]

    def receive(self):
        """The next message; ``None`` when the node asks this process to stop."""
        f = self._queued.pop(0) if self._queued else self._next_frame()
        if f.get("type") == "stopping":
            return None
        if f.get("type") == "error" and f.get("id") is None:
            print(f"spindle refused a message: {f.get('message')}", file=sys.stderr)
        return Message(f)

    def serve(self, handler, on_stopping=None):
        """Answers requests with ``handler(msg)`` until the node asks this
        process to stop; then runs ``on_stopping()`` and returns."""
        while True:
            msg = self.receive()
            if msg is None:
                if on_stopping:
                    on_stopping()
                return
            if msg.type != "request":
                continue
            body = handler(msg)
            if msg.expects_response:
                self.respond(msg, body)


class AsyncSpindle:
    """The asyncio client."""

    def __init__(self, reader, writer):
        self.address = os.environ.get("SPINDLE_ADDRESS")
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._waiting = {}
        self._calls = {}
        self._incoming = asyncio.Queue()
        self._pump = asyncio.ensure_future(self._read_loop())
        period = _heartbeat_period()
        self._beat = asyncio.ensure_future(self._beat_loop(period)) if period else None

    @classmethod
    async def connect(cls):
        sock = socket.socket(fileno=_channel_fd())
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=16 << 20)
        return cls(reader, writer)

    async def _beat_loop(self, period):
        while True:
            await asyncio.sleep(period)
            await self._send({"type": "heartbeat"})

    async def _send(self, frame):
        self._writer.write(_encode(frame))
        await self._writer.drain()

    async def _read_loop(self):
        while True:
            line = await self._reader.readline()
            if not line:
                await self._incoming.put(None)
                return
            f = json.loads(line)
            kind = f.get("type")
            if kind == "reply":
                waiter = self._calls.pop(f.get("id"), None)
            elif kind in ("response", "error"):
                waiter = self._waiting.pop(f.get("id"), None)
            else:
                waiter = None
            if waiter is not None:
                waiter.set_result(f)
            else:
                await self._incoming.put(f)

    async def request(self, target, body=None, timeout=5.0, context=None, capabilities=None):
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        frame = {"type": "request", "target": target, "id": rid,
                 "timeout_ms": int(timeout * 1000), "context": context}
        frame.update(_message_fields(body, capabilities))
        await self._send(frame)
        f = await fut
        if f.get("type") == "error":
            raise SendError(f.get("kind"), f.get("message"), f.get("target"), f.get("context"))
        return Message(f)

    async def tell(self, target, body=None, capabilities=None):
        frame = {"type": "request", "target": target}
        frame.update(_message_fields(body, capabilities))
        await self._send(frame)

    async def respond(self, msg, body=None, capabilities=None):
        frame = {"type": "response", "id": msg.id}
        frame.update(_message_fields(body, capabilities))
        await self._send(frame)

    async def _call(self, frame):
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[rid] = fut
        frame["id"] = rid
        await self._send(frame)
        return _answer(await fut)

    async def capabilities(self):
        return (await self._call(_call_frame("capabilities")))["capabilities"]

    async def save_capabilities(self, caps):
        frame = _call_frame("save_capabilities", capabilities=list(caps))
        return (await self._call(frame))["capabilities"]

    async def drop_capabilities(self, caps):
        frame = _call_frame("drop_capabilities", capabilities=list(caps))
        return (await self._call(frame))["capabilities"]

    async def spawn(self, wasm, name=None, public=False, on_exit="none", capabilities=None, grant_to=None):
        frame = _spawn_frame(wasm, name, public, on_exit, capabilities, grant_to)
        return (await self._call(frame))["address"]

    async def serve(self, handler, on_stopping=None):
        """Answers requests with ``handler(msg)`` (plain or async) until the
        node asks this process to stop."""
        while True:
            f = await self._incoming.get()
            if f is None or f.get("type") == "stopping":
                if on_stopping:
                    r = on_stopping()
                    if asyncio.iscoroutine(r):
                        await r
                return
            if f.get("type") != "request":
                continue
            msg = Message(f)
            body = handler(msg)
            if asyncio.iscoroutine(body):
                body = await body
            if msg.expects_response:
                await self.respond(msg, body)
