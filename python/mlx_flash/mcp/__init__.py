"""The MCP server: tools that act on a running mlx-flash server through its HTTP API."""
