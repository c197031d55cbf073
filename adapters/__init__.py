"""Provider adapters: one module per provider, each speaking its official SDK.

Adapters import only the provider SDKs and the shared job types in `base`; each SDK is
imported inside the adapter on first use so the server starts as fast as a bare MCP server.
"""
