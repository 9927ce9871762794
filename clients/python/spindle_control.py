"""Spindle from inside a Python app: start, stop and watch the services of a
node over its control socket (docs/control-protocol.md). Standard library
only; blocking (``connect``) and asyncio (``connect_async``).

    import spindle_control as spindle
    pm = spindle.connect(owned=True)              # or home=..., bin=...
    ids = pm.start(name="api", script="server.py", restartAt=[100, 500, "1s"])
    for p in pm.list(): print(p["name"], p["state"])
    for line in pm.logs("api", follow=True): print(line["line"])
    pm.stop("api"); pm.close()

Options are the manifest's keys in the seed's spelling (``restartAt``,
``restartOk``, ``stripANSI``; numbers are milliseconds, strings durations);
``script`` runs ``.py`` with python3, ``.js/.mjs/.cjs`` with node, anything
else as a command.

Owned mode (``owned=True``): the app owns a private node (a home of its own
by default). When the app's process ends for any reason — exit, an uncaught
exception, a signal, SIGKILL — the node stops every service and exits.
"""

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

PROTOCOL = 1
VERSION = "0.1.0"
START_DEADLINE = 10.0
# Longest frame the daemon sends (control::MAX_FRAME).
MAX_FRAME = 16 << 20
LEFTOVER_DEADLINE = 120.0

KEYS = {
    "name": "name", "command": "command", "args": "args", "wasm": "wasm",
    "package": "package", "public": "public", "ipc": "ipc", "heartbeat": "heartbeat",
    "cwd": "cwd", "env": "env", "log": "log", "errLog": "err_log",
    "restartAt": "restart_at", "restartOk": "restart_ok", "onExit": "on_exit",
    "grace": "grace", "stopSignal": "stop_signal", "stripANSI": "strip_ansi",
    "timestamps": "timestamps", "maxMemory": "max_memory", "logMaxSize": "log_max_size",
    "logKeep": "log_keep", "maxChildren": "max_children", "mailboxSize": "mailbox_size",
}
DURATIONS = {"heartbeat", "restartOk", "grace"}
SIZES = {"maxMemory", "logMaxSize", "mailboxSize"}


class SpindleError(Exception):
    """An error the daemon answered (``kind``: ``invalid_spec``, ``not_found``,
    …) or one of the client's own (``bad_option``, ``no_daemon``)."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def _duration(key, v):
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise SpindleError("bad_option", f"option `{key}`: give milliseconds or a duration such as '1s'")
    if isinstance(v, int):
        if v < 0:
            raise SpindleError("bad_option", f"option `{key}`: {v} is not a whole number of milliseconds")
        return f"{v}ms"
    return v


def _script_command(script):
    if script.endswith((".js", ".mjs", ".cjs")):
        return "node", [script]
    if script.endswith(".py"):
        return "python3", [script]
    return script, []


def entry(opts):
    """A start's options as the manifest entry the daemon checks."""
    raw = {}
    for k, v in opts.items():
        if v is None or k == "script":
            continue
        key = KEYS.get(k)
        if key is None:
            raise SpindleError(
                "bad_option",
                f"unknown option `{k}`: known options are script, {', '.join(KEYS)}",
            )
        if k in DURATIONS:
            raw[key] = _duration(k, v)
        elif k == "restartAt":
            if not isinstance(v, (list, tuple)):
                raise SpindleError("bad_option", "option `restartAt`: give a list, e.g. [100, 500, '1s']")
            raw[key] = [0 if d == 0 else _duration("restartAt", d) for d in v]
        elif k in SIZES:
            raw[key] = str(v)
        else:
            raw[key] = v
    if opts.get("script") is not None:
        if opts.get("command") is not None or opts.get("wasm") is not None:
            raise SpindleError("bad_option", "give one of `script`, `command` and `wasm`")
        command, first = _script_command(str(opts["script"]))
        raw["command"] = command
        raw["args"] = first + list(opts.get("args") or [])
    return raw


def selector(target):
    if target == "all":
        return "all"
    if isinstance(target, int) and not isinstance(target, bool):
        return {"id": target}
    if isinstance(target, str) and target.isdigit():
        return {"id": int(target)}
    if isinstance(target, str):
        return {"name": target}
    raise SpindleError("bad_option", "name a process by its name, its id, or 'all'")


def default_home(owned):
    if not owned:
        return os.environ.get("SPINDLE_HOME") or os.path.join(os.path.expanduser("~"), ".spindle")
    main = os.path.abspath(sys.argv[0] if sys.argv and sys.argv[0] else "app")
    tag = hashlib.sha256(main.encode()).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "_.-" else "_" for c in os.path.basename(main))
    return os.path.join(os.path.expanduser("~"), ".spindle", "owned", f"{name}-{tag}")


def _record(p):
    return {
        "id": p["id"], "name": p.get("name"), "state": p["state"], "pid": p.get("pid"),
        "restarts": p.get("restarts"), "uptime": p.get("uptime_ms"),
        "lastExit": p.get("last_exit"), "address": p.get("address"),
        "cpu": p.get("cpu_percent"), "memory": p.get("memory_bytes"),
        "command": p.get("command"), "restartIn": p.get("restart_in_ms"),
    }


class _Conn:
    """One connection: lines of JSON, one request at a time, in order."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.write({"op": "hello", "protocol": PROTOCOL, "version": VERSION})
        hello = self.read()
        if hello.get("type") == "error":
            raise SpindleError(hello["kind"], hello["message"])
        self.pid = hello["pid"]
        self.owner = hello.get("owner")

    def write(self, req):
        self.sock.sendall(json.dumps(req).encode() + b"\n")

    def read(self):
        line = self.file.readline()
        if not line:
            raise SpindleError("no_daemon", "the daemon closed the connection")
        return json.loads(line)

    def close(self):
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


def _try_open(path):
    try:
        return _Conn(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def _start_daemon(binary, home, owned):
    os.makedirs(home, mode=0o700, exist_ok=True)
    args = [binary, "--home", home, "daemon", "run"]
    if owned:
        args += ["--owner", str(os.getpid())]
    env = dict(os.environ, SPINDLE_HOME=home)
    env.pop("SPINDLE_TAG", None)
    env.pop("SPINDLE_ID", None)
    log_path = os.path.join(home, "daemon.log")
    with open(log_path, "ab") as log:
        try:
            child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     cwd="/", env=env, start_new_session=True)
        except OSError as e:
            raise SpindleError("no_daemon", f"the daemon did not start ({binary}): {e}") from e
    sock = os.path.join(home, "spindle.sock")
    end = time.monotonic() + START_DEADLINE
    while True:
        conn = _try_open(sock)
        if conn:
            return conn
        if child.poll() is not None:
            conn = _try_open(sock)
            if conn:
                return conn
            raise SpindleError("no_daemon", f"the daemon exited with {child.returncode}; see {log_path}")
        if time.monotonic() > end:
            raise SpindleError("no_daemon", f"the daemon did not answer within {START_DEADLINE:.0f}s; see {log_path}")
        time.sleep(0.002)


def _alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except PermissionError:
        return True
    except OSError:
        return False


def _stop_leftover(conn, sock, home):
    conn.sock.settimeout(LEFTOVER_DEADLINE)
    conn.write({"op": "shutdown"})
    try:
        conn.read()
    except (SpindleError, OSError):
        pass
    conn.close()
    end = time.monotonic() + LEFTOVER_DEADLINE
    while True:
        c = _try_open(sock)
        if c is None:
            return
        c.close()
        if time.monotonic() > end:
            raise SpindleError("no_daemon", f"the node at {home} did not stop")
        time.sleep(0.005)


_LOG_END = object()


def _logs_request(target, follow, lines, stream):
    return {"op": "logs", "target": selector(target), "lines": lines,
            "follow": follow, "stream": stream}


def _log_item(f):
    """A log frame as what `logs` yields; `_LOG_END` at the end."""
    kind = f.get("type")
    if kind == "error":
        raise SpindleError(f["kind"], f["message"])
    if kind == "log_end":
        return _LOG_END
    if kind == "log_line":
        return {"id": f["id"], "name": f.get("name"), "stream": f["stream"],
                "line": f["line"], "time": time.time()}
    if kind == "log_gap":
        return {"id": f["id"], "gap": f["missed"], "time": time.time()}
    return None


def _event_item(f):
    """An event frame as what `events` yields (None for others)."""
    if f.get("type") == "event_gap":
        return {"event": "gap", "missed": f["missed"], "time": time.time()}
    if f.get("type") != "event":
        return None
    exit_ = f.get("exit") or {}
    status = exit_.get("status") or {}
    return {
        "event": f["event"], "id": f["id"], "name": f.get("name"), "time": f["at_ms"] / 1000,
        "pid": f.get("pid"), "reason": str(exit_["reason"]).lower() if exit_ else None,
        "code": status.get("code") if isinstance(status, dict) else None,
        "signal": status.get("signal") if isinstance(status, dict) else None,
        "detail": exit_.get("detail"), "delay": f.get("delay_ms"), "exit": f.get("exit"),
    }


class Manager:
    """The services of one node (blocking)."""

    def __init__(self, conn, home, owned):
        self.conn, self.home, self.owned = conn, home, owned
        self.sock = os.path.join(home, "spindle.sock")

    def call(self, req):
        self.conn.write(req)
        resp = self.conn.read()
        if resp.get("type") == "error":
            raise SpindleError(resp["kind"], resp["message"])
        return resp

    def start(self, opts=None, if_absent=False, **kw):
        """Starts one service (a dict or keywords) or a list, all or nothing;
        returns their ids."""
        items = opts if isinstance(opts, list) else [opts if opts is not None else kw]
        if_absent = if_absent or any(o.get("ifAbsent") for o in items)
        processes = [entry({k: v for k, v in o.items() if k != "ifAbsent"}) for o in items]
        r = self.call({"op": "start_entries", "processes": processes,
                       "base": os.getcwd(), "if_absent": bool(if_absent)})
        return r["ids"]

    def stop(self, target):
        return self.call({"op": "stop", "target": selector(target)})["ids"]

    def restart(self, target):
        return self.call({"op": "restart", "target": selector(target)})["ids"]

    def delete(self, target):
        return self.call({"op": "delete", "target": selector(target)})["ids"]

    def stopall(self):
        return self.stop("all")

    def list(self):
        return [_record(p) for p in self.call({"op": "list"})["processes"]]

    def status(self):
        r = self.call({"op": "status"})
        r.pop("type", None)
        return r

    def send(self, target, body, timeout=5000):
        r = self.call({"op": "send", "target": target, "body": json.dumps(body), "timeout_ms": timeout})
        try:
            parsed = json.loads(r["body"])
        except ValueError:
            parsed = r["body"]
        return {"source": r["source"], "body": parsed, "metadata": r.get("metadata")}

    def logs(self, target, follow=False, lines=10, stream="both"):
        """Whole log lines as dicts ``{id, name, stream, line, time}``."""
        conn = _Conn(self.sock)
        try:
            conn.write(_logs_request(target, follow, lines, stream))
            while True:
                item = _log_item(conn.read())
                if item is _LOG_END:
                    return
                if item is not None:
                    yield item
        finally:
            conn.close()

    def events(self):
        """Lifecycle events as they happen (started, stopping, exited with
        reason, code or signal and detail, restarting with its delay,
        stopped, deleted), on a connection of its own: an iterator, returned
        once the subscription is live (every later event will be in it)."""
        conn = _Conn(self.sock)
        conn.write({"op": "events"})
        first = conn.read()
        if first.get("type") != "subscribed":
            conn.close()
            raise SpindleError(first.get("kind", "no_daemon"), first.get("message", "no subscription"))

        def stream():
            try:
                while True:
                    item = _event_item(conn.read())
                    if item is not None:
                        yield item
            finally:
                conn.close()

        return stream()

    def shutdown(self):
        self.call({"op": "shutdown"})
        self.close()

    def close(self):
        self.conn.close()


def connect(owned=False, home=None, bin=None):
    """Connects to a node, starting its daemon if none answers."""
    home = os.path.abspath(home or default_home(owned))
    binary = bin or os.environ.get("SPINDLE_BIN") or "spindle"
    sock = os.path.join(home, "spindle.sock")
    conn = _try_open(sock)
    if conn and owned and conn.owner == os.getpid():
        return Manager(conn, home, owned)  # this process's own node
    if conn and owned and conn.owner and _alive(conn.owner):
        conn.close()
        raise SpindleError(
            "owned_elsewhere",
            f"the node at {home} is owned by process {conn.owner}, another run of this app: "
            "give this one a home of its own (connect(owned=True, home=...))",
        )
    if conn and owned:
        # A daemon of an earlier run of this app (its owner is gone): stop
        # it, set and all, so there is never a second set.
        _stop_leftover(conn, sock, home)
        conn = None
    if conn is None:
        conn = _start_daemon(binary, home, owned)
    return Manager(conn, home, owned)


class AsyncManager:
    """The same API for asyncio: each call runs the blocking one in a
    thread, one at a time, so the event loop never blocks on the socket;
    `logs` is an asyncio stream of its own."""

    def __init__(self, manager):
        self._m = manager
        self._lock = asyncio.Lock()
        self.home, self.owned = manager.home, manager.owned

    async def _run(self, f, *a, **kw):
        async with self._lock:
            return await asyncio.to_thread(f, *a, **kw)

    async def start(self, opts=None, if_absent=False, **kw):
        return await self._run(self._m.start, opts, if_absent, **kw)

    async def stop(self, target):
        return await self._run(self._m.stop, target)

    async def restart(self, target):
        return await self._run(self._m.restart, target)

    async def delete(self, target):
        return await self._run(self._m.delete, target)

    async def stopall(self):
        return await self._run(self._m.stopall)

    async def list(self):
        return await self._run(self._m.list)

    async def status(self):
        return await self._run(self._m.status)

    async def send(self, target, body, timeout=5000):
        return await self._run(self._m.send, target, body, timeout)

    async def logs(self, target, follow=False, lines=10, stream="both"):
        """Log lines as an async iterator, on a connection of its own (an
        asyncio stream: a cancelled reader closes it, and holds no thread)."""
        reader, writer = await asyncio.open_unix_connection(self._m.sock, limit=MAX_FRAME)
        try:
            writer.write(json.dumps({"op": "hello", "protocol": PROTOCOL, "version": VERSION}).encode() + b"\n")
            writer.write(json.dumps(_logs_request(target, follow, lines, stream)).encode() + b"\n")
            await writer.drain()
            hello = json.loads(await reader.readline() or b"{}")
            if hello.get("type") != "hello":
                raise SpindleError(hello.get("kind", "no_daemon"), hello.get("message", "no greeting"))
            while True:
                line = await reader.readline()
                if not line:
                    if follow:
                        return
                    raise SpindleError("no_daemon", "the daemon closed the connection")
                item = _log_item(json.loads(line))
                if item is _LOG_END:
                    return
                if item is not None:
                    yield item
        finally:
            writer.close()

    async def events(self):
        """Lifecycle events: an async iterator on an asyncio stream of its
        own, returned once the subscription is live."""
        reader, writer = await asyncio.open_unix_connection(self._m.sock, limit=MAX_FRAME)
        try:
            writer.write(json.dumps({"op": "hello", "protocol": PROTOCOL, "version": VERSION}).encode() + b"\n")
            writer.write(b'{"op":"events"}\n')
            await writer.drain()
            for want in ("hello", "subscribed"):
                f = json.loads(await reader.readline() or b"{}")
                if f.get("type") != want:
                    raise SpindleError(f.get("kind", "no_daemon"), f.get("message", "no subscription"))
        except BaseException:
            writer.close()
            raise

        async def stream():
            try:
                while True:
                    line = await reader.readline()
                    if not line:
                        return
                    item = _event_item(json.loads(line))
                    if item is not None:
                        yield item
            finally:
                writer.close()

        return stream()

    async def shutdown(self):
        return await self._run(self._m.shutdown)

    async def close(self):
        return await self._run(self._m.close)


async def connect_async(owned=False, home=None, bin=None):
    """``connect`` for asyncio."""
    return AsyncManager(await asyncio.to_thread(connect, owned, home, bin))
