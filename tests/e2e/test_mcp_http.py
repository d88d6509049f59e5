"""Streamable HTTP MCP at `/mcp` through the sidecar, driven by the official `mcp` client against a real
`mlx-flash serve --workers 2 --model demo --api-key K`: both connection styles, each tool for real,
the caller's key carried into the tools' calls, errors in JSON-RPC's shape, Origin checked."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from helpers import MCP_INITIALIZE, Sidecar, mlx_flash_command, run_sidecar

KEY = "mcp-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    log = tmp_path_factory.mktemp("mcp-http") / "sidecar.log"
    with run_sidecar(log, "--model", "demo", f"--api-key={KEY}", workers=2) as s:
        yield s


def _text(result: Any) -> str:
    assert not result.is_error, result
    return "".join(getattr(c, "text", "") for c in result.content)


async def _session(url: str, mode: str, headers: dict[str, str]) -> dict[str, Any]:
    started = time.monotonic()
    http = httpx2.AsyncClient(headers=headers, timeout=120)
    async with Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode) as client:  # type: ignore[arg-type]
        connected = time.monotonic() - started
        tools = {t.name: t for t in (await client.list_tools()).tools}
        out: dict[str, Any] = {"connected": connected, "tools": tools}
        out["list_models"] = _text(await client.call_tool("list_models", {}))
        out["generate"] = _text(await client.call_tool("generate", {"prompt": "Hello", "max_tokens": 8}))
        messages = [{"role": "user", "content": "Hi"}]
        out["chat"] = _text(await client.call_tool("chat", {"messages": messages, "max_tokens": 8}))
        out["check_memory"] = _text(await client.call_tool("check_memory", {}))
        out["get_status"] = _text(await client.call_tool("get_status", {}))
        out["unload_model"] = _text(await client.call_tool("unload_model", {"model": "demo"}))
        out["load_model"] = _text(await client.call_tool("load_model", {"model": "demo"}))
        missing = await client.call_tool("load_model", {"model": "no-such-model"})
        out["missing"] = missing
        # A name is a name, not a path: this once resolved to POST /admin/api/shutdown.
        out["escape"] = await client.call_tool("load_model", {"model": "../shutdown?"})
    await http.aclose()
    return out


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_every_tool_over_http_in_both_connection_styles(server: Sidecar, mode: str) -> None:
    out = asyncio.run(_session(server.url, mode, AUTH))
    assert out["connected"] < 1.0, out["connected"]
    tools = out["tools"]
    names = ["generate", "chat", "list_models", "load_model", "unload_model", "check_memory", "get_status"]
    assert set(names) <= set(tools)
    for name in names:
        assert tools[name].description and tools[name].input_schema["type"] == "object"
        assert "ctx" not in tools[name].input_schema.get("properties", {})
    assert tools["generate"].input_schema["required"] == ["prompt"]

    assert "demo" in out["list_models"]
    direct = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "demo", "prompt": "Hello", "max_tokens": 8, "temperature": 0},
        headers=AUTH,
        timeout=60,
    ).json()["choices"][0]["text"]
    assert out["generate"] == direct and direct
    assert out["chat"]
    assert json.loads(out["check_memory"])["total_bytes"] > 0
    assert json.loads(out["get_status"])["workers"]["ready"] == 2
    # load and unload went through the sidecar: every worker answered.
    for action in ("unload_model", "load_model"):
        results = json.loads(out[action])["results"]
        assert sorted(r["worker"] for r in results) == ["worker-0", "worker-1"], results
        assert all(r["status"] == 200 for r in results), results
    assert out["missing"].is_error and "404" in _text_of(out["missing"])
    assert out["escape"].is_error and "404" in _text_of(out["escape"])
    server.wait_ready(2, headers=AUTH)


def _text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def _post(server: Sidecar, message: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.url}/mcp", json=message, headers={**ACCEPT, **headers}, timeout=30)


def _rpc(response: httpx.Response) -> dict[str, Any]:
    """The one JSON-RPC message of a JSON or single-event SSE response."""
    if response.headers["content-type"].startswith("text/event-stream"):
        data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert len(data) == 1, response.text
        return dict(json.loads(data[0]))
    return dict(response.json())


def test_unknown_method_is_32601_in_both_styles(server: Sidecar) -> None:
    reply = _rpc(_post(server, MCP_INITIALIZE, AUTH))
    assert reply["id"] == 1 and reply["result"]["serverInfo"]["name"] == "mlx-flash"
    legacy = _post(server, {"jsonrpc": "2.0", "id": 2, "method": "no/such/method"}, AUTH)
    assert _rpc(legacy)["error"]["code"] == -32601
    # The 2026-07-28 style: no handshake; version and method in headers and _meta; one message per POST.
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    modern = _post(
        server,
        {"jsonrpc": "2.0", "id": 3, "method": "no/such/method", "params": {"_meta": meta}},
        {**AUTH, "mcp-protocol-version": "2026-07-28", "mcp-method": "no/such/method"},
    )
    assert _rpc(modern)["error"]["code"] == -32601, modern.text


def test_refusals_are_json_rpc_errors(server: Sidecar) -> None:
    ping = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    for headers, status in [
        ({}, 401),
        ({"authorization": "Bearer wrong"}, 401),
        ({**AUTH, "origin": "http://evil.example"}, 403),
    ]:
        r = _post(server, ping, headers)
        assert r.status_code == status, r.text
        body = r.json()
        assert body["jsonrpc"] == "2.0" and body["id"] is None
        assert body["error"]["code"] == -32000 and body["error"]["data"]["status"] == status
        assert body["error"]["message"]
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
    # A page served by the server itself (same origin) may talk to it.
    same = _post(server, ping, {**AUTH, "origin": server.url})
    assert same.status_code == 200, same.text


def test_the_tools_carry_the_callers_key(server: Sidecar) -> None:
    """The key the client sent (here as x-api-key) is the one the tools call the API with: the sidecar
    has no key of its own to hand out."""

    async def status() -> str:
        http = httpx2.AsyncClient(headers={"x-api-key": KEY}, timeout=60)
        async with Client(streamable_http_client(f"{server.url}/mcp", http_client=http)) as client:
            text = _text(await client.call_tool("get_status", {}))
        await http.aclose()
        return text

    assert json.loads(asyncio.run(status()))["workers"]["total"] == 2


def test_stdio_bridge_carries_its_key_and_names_a_refusal(server: Sidecar) -> None:
    """`mlx-flash mcp --api-key K` against a keyed server: the key reaches the tools; a wrong key is the
    sidecar's 401 as the answer to the client's own request."""

    async def status(key: str) -> str:
        cmd = mlx_flash_command()
        args = [*cmd[1:], "mcp", "--url", server.url, "--api-key", key]
        params = StdioServerParameters(command=cmd[0], args=args)
        async with Client(params) as client:
            return _text(await client.call_tool("get_status", {}))

    assert json.loads(asyncio.run(status(KEY)))["workers"]["total"] == 2
    with pytest.raises(Exception) as refused:
        asyncio.run(status("wrong"))
    error = refused.value  # the client raises it inside its task groups
    while len(getattr(error, "exceptions", ())) == 1:  # an exception group of one
        error = error.exceptions[0]  # type: ignore[attr-defined]
    assert isinstance(error, MCPError), refused.value
    assert error.error.code == -32000 and error.error.data["status"] == 401
