"""The MCP face: tools, resources, prompt and completion, the middleware every call passes, transports."""
