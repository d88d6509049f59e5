"""`mlx-flash mcp` driven by the official `mcp` client against a real `mlx-flash serve --model demo`:
both connection styles, each tool for real, -32601 for unknown methods, stdout only protocol."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters

from helpers import Sidecar, mlx_flash_command, run_sidecar


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
        return out


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
def test_every_tool_over_stdio_in_both_connection_styles(server: Sidecar, mode: str) -> None:
    out = asyncio.run(_session(server.url, mode))
    # Cold start of the mcp process included: python import of the SDK and the handshake/discover.
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
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
    assert any(m["id"] == "demo" for m in models)


def test_unknown_method_is_32601_and_stdout_is_only_protocol(server: Sidecar) -> None:
    with subprocess.Popen(
        [*mlx_flash_command(), "mcp", "--url", server.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        _exchange(proc)


def _exchange(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin and proc.stdout
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    for message in [
        init,
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "no/such/method"},
    ]:
        proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()
    try:
        replies = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert replies[0]["id"] == 1 and "serverInfo" in replies[0]["result"]
        assert replies[1]["id"] == 2 and replies[1]["error"]["code"] == -32601
        proc.stdin.close()  # EOF ends the server
        assert proc.wait(10) == 0
        assert proc.stdout.read() == ""  # nothing but the two protocol messages
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
