"""`mlx-flash mcp` driven by the official `mcp` client against a real `mlx-flash serve --model demo`:
both connection styles, each tool for real, -32601 for unknown methods, stdout only protocol,
cancellation, and a clear error when the server is not there."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters

from helpers import MCP_INITIALIZE, Sidecar, mlx_flash_command, run_sidecar


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    log = tmp_path_factory.mktemp("mcp") / "sidecar.log"
    with run_sidecar(log, "--model", "demo", workers=1) as s:
        yield s


def _params(url: str) -> StdioServerParameters:
    cmd = mlx_flash_command()
    return StdioServerParameters(command=cmd[0], args=[*cmd[1:], "mcp", "--url", url])


def _text(result: Any) -> str:
    assert not result.is_error, result
    return "".join(getattr(c, "text", "") for c in result.content)


async def _session(url: str, mode: str) -> dict[str, Any]:
    started = time.monotonic()
    async with Client(_params(url), mode=mode) as client:  # type: ignore[arg-type]
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
        out["missing_is_error"] = missing.is_error
        # A name that is not plain ASCII travels base64-wrapped in the 2026-07-28 style's Mcp-Name.
        unknown = await client.call_tool("générer", {})
        out["unknown_tool"] = "".join(getattr(c, "text", "") for c in unknown.content)
        return out


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_every_tool_over_stdio_in_both_connection_styles(server: Sidecar, mode: str) -> None:
    out = asyncio.run(_session(server.url, mode))
    # Cold start of the `mlx-flash mcp` process included, and the handshake/discover.
    assert out["connected"] < 1.0, out["connected"]
    tools = out["tools"]
    names = ["generate", "chat", "list_models", "load_model", "unload_model", "check_memory", "get_status"]
    assert set(names) <= set(tools)
    for name in names:
        assert tools[name].description and tools[name].input_schema["type"] == "object"
    assert tools["chat"].input_schema["required"] == ["messages"]

    assert "demo" in out["list_models"]
    # Greedy: the tool's text equals what the server's own API returns for the same request.
    direct = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "demo", "prompt": "Hello", "max_tokens": 8, "temperature": 0},
        timeout=60,
    ).json()["choices"][0]["text"]
    assert out["generate"] == direct and direct
    assert out["chat"]
    assert json.loads(out["check_memory"])["total_bytes"] > 0
    assert json.loads(out["get_status"])["workers"]["ready"] == 1
    assert out["missing_is_error"]
    assert "générer" in out["unknown_tool"], out["unknown_tool"]
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert any(m["id"] == "demo" for m in models)


@contextlib.contextmanager
def _bridge(url: str) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [*mlx_flash_command(), "mcp", "--url", url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def _send(proc: subprocess.Popen[str], *messages: dict[str, Any]) -> None:
    assert proc.stdin
    for message in messages:
        proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()


def _reply(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout
    reply: dict[str, Any] = json.loads(proc.stdout.readline())
    return reply


def _end(proc: subprocess.Popen[str]) -> str:
    """Close stdin (EOF ends the bridge) and return what stdout still had."""
    assert proc.stdin and proc.stdout
    proc.stdin.close()
    assert proc.wait(10) == 0
    return proc.stdout.read()


def test_unknown_method_is_32601_and_stdout_is_only_protocol(server: Sidecar) -> None:
    with _bridge(server.url) as proc:
        _send(proc, MCP_INITIALIZE, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        _send(proc, {"jsonrpc": "2.0", "id": 2, "method": "no/such/method"})
        replies = [_reply(proc) for _ in range(2)]
        assert replies[0]["id"] == 1 and "serverInfo" in replies[0]["result"]
        assert replies[1]["id"] == 2 and replies[1]["error"]["code"] == -32601
        _send(proc, {"jsonrpc": "2.0", "id": 3, "method": "ping"})  # answered before EOF ends it
        assert _end(proc) == '{"jsonrpc":"2.0","id":3,"result":{}}\n'  # protocol messages only


def _in_flight(server: Sidecar) -> int:
    return int(httpx.get(f"{server.url}/admin/api/status", timeout=10).json()["in_flight"])


def _until(what: str, done: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_cancelling_a_tool_call_frees_its_generation_at_once(server: Sidecar) -> None:
    """notifications/cancelled closes the request's HTTP stream: the generation stops, no reply comes."""
    with _bridge(server.url) as proc:
        _send(proc, MCP_INITIALIZE)
        assert "serverInfo" in _reply(proc)["result"]
        arguments = {"prompt": "Count from one to one thousand: one, two, three,", "max_tokens": 900}
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
        _send(proc, {**call, "params": {"name": "generate", "arguments": arguments}})
        _until("the generation starts", lambda: _in_flight(server) > 0)
        cancelled = time.monotonic()
        _send(proc, {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2}})
        _until("the cancelled generation ends", lambda: _in_flight(server) == 0, timeout=5)
        assert time.monotonic() - cancelled < 2.0
        _send(proc, {"jsonrpc": "2.0", "id": 3, "method": "ping"})
        assert _reply(proc) == {"jsonrpc": "2.0", "id": 3, "result": {}}  # and none for id 2
        assert _end(proc) == ""


def test_a_server_that_is_not_there_is_a_clear_json_rpc_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        with _bridge(url) as proc:
            _send(proc, MCP_INITIALIZE)
            reply = _reply(proc)
            assert reply["id"] == 1 and reply["error"]["code"] == -32000
            assert f"cannot reach the mlx-flash server at {url}" in reply["error"]["message"]
            assert _end(proc) == ""
