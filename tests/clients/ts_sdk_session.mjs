// Drives the gateway with the TypeScript SDK v1 client (@modelcontextprotocol/sdk), as a desktop
// agent built on it would: connect, list the tools (which arms the client's output-schema checks),
// then call. The plan is JSON in argv[2]: {sessions: [{name, transport: "stdio" | "http", command,
// args, env, url, headers, steps: [{id, method, ...}]}]}. Each session is one connection; each event
// is one JSON line on stdout, for tests/test_js_clients.py to assert on. Nothing here knows what the
// gateway answers: it reports what the client accepted and what it threw.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { LoggingMessageNotificationSchema } from "@modelcontextprotocol/sdk/types.js";

const plan = JSON.parse(process.argv[2]);
const emit = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function transportFor(session) {
  if (session.transport === "stdio") {
    return new StdioClientTransport({
      command: session.command,
      args: session.args,
      env: session.env,
      stderr: "inherit",
    });
  }
  return new StreamableHTTPClientTransport(new URL(session.url), {
    requestInit: { headers: session.headers ?? {} },
  });
}

function described(error) {
  return {
    name: error?.constructor?.name ?? typeof error,
    code: error?.code ?? null,
    message: String(error?.message ?? error),
  };
}

async function run(client, step) {
  switch (step.method) {
    case "tools/list":
      return client.listTools();
    case "tools/call":
      return client.callTool({ name: step.name, arguments: step.arguments ?? {} });
    case "prompts/get":
      return client.getPrompt({ name: step.name, arguments: step.arguments ?? {} });
    case "completion/complete":
      return client.complete({ ref: step.ref, argument: step.argument });
    case "logging/setLevel":
      return client.setLoggingLevel(step.level);
    case "resources/read":
      return client.readResource({ uri: step.uri });
    case "sleep":
      await sleep(step.ms);
      return {};
    default:
      throw new Error(`unknown step method ${step.method}`);
  }
}

for (const session of plan.sessions) {
  const client = new Client({ name: "qpu-gateway-tests", version: "1.0.0" });
  client.setNotificationHandler(LoggingMessageNotificationSchema, (notification) =>
    emit({ session: session.name, event: "log", params: notification.params }),
  );
  const transport = transportFor(session);
  // The client tells the transport the version initialize negotiated; keep a copy to report.
  let protocolVersion = null;
  const setProtocolVersion = transport.setProtocolVersion?.bind(transport);
  transport.setProtocolVersion = (version) => {
    protocolVersion = version;
    setProtocolVersion?.(version);
  };
  try {
    await client.connect(transport);
  } catch (error) {
    emit({ session: session.name, event: "connect_failed", error: described(error) });
    await transport.close().catch(() => {});
    continue;
  }
  emit({ session: session.name, event: "connected", protocolVersion, server: client.getServerVersion() });
  for (const step of session.steps) {
    try {
      emit({ session: session.name, step: step.id, ok: true, result: await run(client, step) });
    } catch (error) {
      emit({ session: session.name, step: step.id, ok: false, error: described(error) });
    }
  }
  await client.close();
}
