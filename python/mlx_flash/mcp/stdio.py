"""`mlx-flash mcp`: MCP over stdio for a running server, bridged to that server's own `/mcp`.

The tools live in one place, the server's Streamable HTTP endpoint (`server.py`, the official SDK);
this process only moves JSON-RPC messages between stdin/stdout and `POST {url}/mcp`, so it starts in
a fraction of a second without importing the SDK or MLX. stdout carries only protocol messages (logs
go to stderr); the process ends on stdin EOF, once the requests in flight have been answered.

What an HTTP client adds to a message, the bridge adds too: the key, the protocol version negotiated
by `initialize` (handshake style) or the routing headers the 2026-07-28 style mirrors from each
request's `_meta`. `notifications/cancelled` closes the cancelled request's connection, which is how
HTTP cancels: the server frees the request's slot at once.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import logging
import os
import re
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from typing import IO, Any

log = logging.getLogger("mlx_flash.mcp")

DEFAULT_URL = "http://127.0.0.1:8080"
# The 2026-07-28 style's per-request envelope key (MCP spec, "Per-request protocol fields").
PROTOCOL_VERSION_META_KEY = "io.modelcontextprotocol/protocolVersion"
# Methods whose named parameter HTTP mirrors in `Mcp-Name` (spec: Streamable HTTP routing headers).
NAME_BEARING_METHODS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
_HEADER_SAFE = re.compile(r"[\x20-\x7e]*")
_BASE64_SENTINEL = re.compile(r"=\?base64\?.*\?=")
# JSON-RPC's reserved "server error" range: the server behind the bridge did not answer.
UNREACHABLE = -32000
PARSE_ERROR = -32700


def header_value(value: str) -> str:
    """`value` as an HTTP field value: verbatim if it survives one, else the spec's base64 sentinel."""
    if _HEADER_SAFE.fullmatch(value) and value == value.strip() and not _BASE64_SENTINEL.fullmatch(value):
        return value
    return f"=?base64?{base64.b64encode(value.encode()).decode('ascii')}?="


def routing_headers(message: Any, negotiated: str | None) -> dict[str, str]:
    """The MCP headers an HTTP client sends with `message`."""
    params = message.get("params") if isinstance(message, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    version = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None
    if not isinstance(version, str):
        return {"mcp-protocol-version": negotiated} if negotiated else {}
    assert isinstance(params, dict)
    method = message.get("method")
    headers = {"mcp-protocol-version": version}
    if isinstance(method, str):
        headers["mcp-method"] = method
        name = params.get(NAME_BEARING_METHODS.get(method, ""))
        if isinstance(name, str):
            headers["mcp-name"] = header_value(name)
    return headers


def sse_messages(response: http.client.HTTPResponse) -> Iterator[Any]:
    """The JSON-RPC messages of a `text/event-stream` response, one per event's data."""
    data: list[str] = []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield json.loads("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield json.loads("\n".join(data))


def _error_text(status: int, body: bytes) -> str:
    """The server's own message from a non-JSON-RPC error body (the API's error shape), else the body."""
    try:
        error = json.loads(body).get("error")
        text = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        text = None
    return f"the server answered {status}: {text or body.decode('utf-8', 'replace').strip()[:500]}"


class Bridge:
    def __init__(self, url: str, api_key: str | None, out: IO[bytes]) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url must be http(s)://host[:port], not {url!r}")
        self.url = url
        https = parts.scheme == "https"
        self._connection = http.client.HTTPSConnection if https else http.client.HTTPConnection
        self._host, self._port = parts.hostname, parts.port
        self._path = parts.path.rstrip("/") + "/mcp"
        self._auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._out = out
        self._lock = threading.Lock()
        self._negotiated: str | None = None
        self._in_flight: dict[Any, http.client.HTTPConnection] = {}
        self._cancelled: set[Any] = set()

    def run(self, lines: IO[bytes]) -> None:
        threads: list[threading.Thread] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError as e:
                error = {"code": PARSE_ERROR, "message": f"Parse error: {e}"}
                self._write({"jsonrpc": "2.0", "id": None, "error": error})
                continue
            if isinstance(message, dict) and message.get("method") == "notifications/cancelled":
                self._cancel(message)
            request_id = message.get("id") if isinstance(message, dict) and "method" in message else None
            connection = self._connection(self._host, self._port)
            if request_id is not None:
                with self._lock:
                    self._in_flight[request_id] = connection
            if isinstance(message, dict) and message.get("method") == "initialize":
                self.forward(message, request_id, connection)  # answered before anything after it is sent
                continue
            args = (message, request_id, connection)
            thread = threading.Thread(target=self.forward, args=args, daemon=True)
            thread.start()
            threads = [t for t in threads if t.is_alive()] + [thread]
        for thread in threads:
            thread.join()

    def forward(self, message: Any, request_id: Any, connection: http.client.HTTPConnection) -> None:
        """POST one message to `/mcp` and write what comes back (nothing for a notification)."""
        headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            **self._auth,
            **routing_headers(message, self._negotiated),
        }
        try:
            if request_id in self._cancelled:
                return
            connection.request("POST", self._path, json.dumps(message).encode(), headers)
            if request_id in self._cancelled:
                return
            response = connection.getresponse()
            if response.getheader("content-type", "").startswith("text/event-stream"):
                for reply in sse_messages(response):
                    if request_id in self._cancelled:
                        return
                    self._deliver(reply)
                return
            body = response.read()
            try:
                reply = json.loads(body) if body.strip() else None
            except ValueError:
                reply = None
            if isinstance(reply, dict) and reply.get("jsonrpc") == "2.0":
                if reply.get("id") is None and "error" in reply:
                    reply["id"] = request_id  # the sidecar's refusals (key, Origin) name no request
                self._deliver(reply)
            elif response.status >= 400:
                self._fail(request_id, _error_text(response.status, body))
        except (OSError, http.client.HTTPException) as e:
            if request_id not in self._cancelled:
                self._fail(request_id, f"cannot reach the mlx-flash server at {self.url}: {e}")
        except ValueError as e:  # an event that is not JSON
            self._fail(request_id, f"the mlx-flash server at {self.url} answered malformed JSON-RPC: {e}")
        finally:
            connection.close()
            with self._lock:
                self._in_flight.pop(request_id, None)
                self._cancelled.discard(request_id)

    def _cancel(self, message: dict[str, Any]) -> None:
        params = message.get("params")
        request_id = params.get("requestId") if isinstance(params, dict) else None
        with self._lock:
            connection = self._in_flight.get(request_id)
            if connection is None:
                return
            self._cancelled.add(request_id)
            # Closing the request's stream is HTTP's cancellation; the reader thread ends quietly.
            if connection.sock is not None:
                with contextlib.suppress(OSError):
                    connection.sock.shutdown(socket.SHUT_RDWR)

    def _deliver(self, reply: Any) -> None:
        result = reply.get("result") if isinstance(reply, dict) else None
        if not isinstance(result, dict):
            result = {}
        version = result.get("protocolVersion")
        if isinstance(version, str) and "serverInfo" in result:  # the answer to `initialize`
            self._negotiated = version
        self._write(reply)

    def _fail(self, request_id: Any, text: str) -> None:
        log.error("%s", text)
        if request_id is not None:
            self._write({"jsonrpc": "2.0", "id": request_id, "error": {"code": UNREACHABLE, "message": text}})

    def _write(self, message: Any) -> None:
        line = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        with self._lock, contextlib.suppress(BrokenPipeError, ValueError):  # the client closed stdout
            self._out.write(line)
            self._out.flush()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlx-flash mcp", description=__doc__.splitlines()[0])
    p.add_argument(
        "--url",
        default=os.environ.get("MLX_FLASH_URL", DEFAULT_URL),
        help=f"the running mlx-flash server (default {DEFAULT_URL})",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("MLX_FLASH_API_KEY"),
        help="the server's API key, if it has one (or MLX_FLASH_API_KEY)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)  # never stdout: it is the protocol
    try:
        bridge = Bridge(args.url, args.api_key, sys.stdout.buffer)
    except ValueError as e:
        p.error(str(e))
    bridge.run(sys.stdin.buffer)
    return 0
