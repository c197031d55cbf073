"""qpu-gateway: an MCP server that gives agents safe, budgeted, audited access to quantum computers."""

__version__ = "0.1.0"
