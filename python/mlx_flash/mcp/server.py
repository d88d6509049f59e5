"""The MCP server whose tools call a running mlx-flash server over its HTTP API.

Every worker the sidecar starts serves it as Streamable HTTP at `/mcp` (stateless: any worker answers
any request); its tools call back the sidecar with the caller's own credentials and never load a model
themselves. `mlx-flash mcp` (stdio) bridges to this same endpoint. The official `mcp` SDK answers both
connection styles: the `initialize` handshake and the stateless 2026-07-28 `server/discover`; unknown
methods get -32601.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette

CREDENTIALS = ("authorization", "x-api-key")


class Api:
    """The sidecar's HTTP API; each call carries the credentials of the MCP request it serves."""

    def __init__(self, url: str) -> None:
        self.client = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=600)

    async def get(self, ctx: Context, path: str) -> Any:
        response = await self.client.get(path, headers=_credentials(ctx))
        return _json(response)

    async def post(self, ctx: Context, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self.client.post(path, json=body or {}, headers=_credentials(ctx))
        return _json(response)


def _credentials(ctx: Context) -> dict[str, str]:
    """The key headers of the HTTP request behind `ctx`."""
    headers = ctx.headers or {}
    return {name: headers[name] for name in CREDENTIALS if name in headers}


def _json(response: httpx.Response) -> Any:
    """The body, or an error naming the server's own message (the SDK turns it into isError)."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    if response.is_error:
        raise ToolError(f"server answered {response.status_code}: {body}")
    return body


def build(url: str) -> MCPServer:
    """The MCP server with its seven tools, bound to the server at `url`."""
    api = Api(url)
    mcp: MCPServer = MCPServer(
        "mlx-flash",
        instructions="Generate text with local MLX models and manage the mlx-flash server at " + url,
    )

    @mcp.tool()
    async def generate(
        ctx: Context, prompt: str, model: str | None = None, max_tokens: int = 256, temperature: float = 0.0
    ) -> str:
        """Complete raw text (no chat template) with a loaded model; returns the completion text.

        prompt: the text to continue. model: a name from list_models (default: the server's first).
        max_tokens: at most this many new tokens. temperature: 0 is greedy (deterministic).
        """
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
        body["model"] = model or await _default_model(ctx, api)
        reply = await api.post(ctx, "/v1/completions", body)
        return str(reply["choices"][0]["text"])

    @mcp.tool()
    async def chat(
        ctx: Context,
        messages: list[dict[str, str]],
        model: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
    ) -> str:
        """Answer a conversation with a loaded model, using its chat template; returns the reply.

        messages: [{"role": "system"|"user"|"assistant", "content": "..."}], oldest first.
        model: a name from list_models (default: the server's first). temperature: 0 is greedy.
        """
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        body["model"] = model or await _default_model(ctx, api)
        reply = await api.post(ctx, "/v1/chat/completions", body)
        return str(reply["choices"][0]["message"]["content"] or "")

    @mcp.tool()
    async def list_models(ctx: Context) -> list[dict[str, Any]]:
        """The models this server knows (OpenAI /v1/models entries: id, status, ...)."""
        return list((await api.get(ctx, "/v1/models"))["data"])

    @mcp.tool()
    async def load_model(ctx: Context, model: str) -> Any:
        """Load `model` (a name, alias or local path) into the workers so requests can use it."""
        return await api.post(ctx, f"/admin/api/models/{quote(model, safe='')}/load")

    @mcp.tool()
    async def unload_model(ctx: Context, model: str) -> Any:
        """Unload `model` from the workers, freeing its memory."""
        return await api.post(ctx, f"/admin/api/models/{quote(model, safe='')}/unload")

    @mcp.tool()
    async def check_memory(ctx: Context) -> Any:
        """This machine's memory as the server sees it (total, available, pressure; bytes)."""
        return (await api.get(ctx, "/admin/api/status"))["memory"]

    @mcp.tool()
    async def get_status(ctx: Context) -> Any:
        """The server's status: version, uptime, workers ready/failed, requests in flight, memory."""
        return await api.get(ctx, "/admin/api/status")

    return mcp


async def _default_model(ctx: Context, api: Api) -> str:
    data = (await api.get(ctx, "/v1/models"))["data"]
    if not data:
        raise ToolError("the server has no model; load one with load_model")
    return str(data[0]["id"])


def http_app(sidecar_url: str) -> tuple[Starlette, MCPServer]:
    """Streamable HTTP at `/mcp` for a worker behind the sidecar at `sidecar_url`; run the server's
    `session_manager` in the host app's lifespan. Stateless, so no session sticks to a worker. Host,
    Origin and key are the sidecar's to check (it is the only way in), so the SDK's own checks are off."""
    mcp = build(sidecar_url)
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    return mcp.streamable_http_app(stateless_http=True, transport_security=security), mcp
