"""Traces: a real gateway process exports OTLP/HTTP to a loopback receiver that decodes what it gets.

The receiver is a plain HTTP server parsing the OpenTelemetry protobuf (opentelemetry-proto's own
ExportTraceServiceRequest); the gateway uses the real SDK and exporter, configured only by OTEL_*
variables as an operator would.
"""

from __future__ import annotations

import http.server
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from qpu_gateway.config import Config
from qpu_gateway.telemetry import tracing

from .support import BELL2, body, http_client, start_http_server

pytestmark = pytest.mark.anyio


class Receiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        received = self.spans

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(data)
                for resource in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            received.append(
                                {
                                    "name": span.name,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent": span.parent_span_id.hex(),
                                    "status": span.status.code,
                                    "service": service.get("service.name"),
                                    "attributes": {a.key: _value(a.value) for a in span.attributes},
                                }
                            )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.server.shutdown()


def test_traces_are_off_unless_the_otel_variables_ask() -> None:
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_SERVICE_NAME": "x"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})
    # Off (as in this test process), the job's spans are nothing at all.
    assert not tracing.enabled() and tracing.current_traceparent() is None
    with tracing.span("job.admission") as span:
        assert span.span is None


async def test_a_job_retried_twice_shows_three_attempts_with_their_codes_under_the_callers_trace(
    config: Config, alice_key: str, receiver: Receiver
) -> None:
    server = start_http_server(
        config,
        QPU_GATEWAY_FAULTS="transient,transient",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
        OTEL_SERVICE_NAME="gateway-under-test",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    try:
        async with http_client(server.url, alice_key) as client:
            meta: Any = {"traceparent": f"00-{trace_id}-{caller}-01"}  # the client's own trace
            submitted = body(
                await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"}, meta=meta)
            )
            done = body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]}))
    finally:
        server.stop()  # the exporter sends what it holds at exit
    assert done["state"] == "succeeded"

    mine = [s for s in receiver.spans if s["trace_id"] == trace_id]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in mine:
        by_name.setdefault(span["name"], []).append(span)
    assert {s["service"] for s in mine} == {"gateway-under-test"}
    call = by_name["tools/call submit_job"][0]
    assert call["parent"] == caller  # the client's traceparent continued
    assert call["attributes"]["mcp.method.name"] == "tools/call"
    assert call["attributes"]["gen_ai.tool.name"] == "submit_job"
    admission = by_name["job.admission"][0]
    assert admission["parent"] == call["span_id"]
    assert admission["attributes"]["qpu_gateway.job.id"] == submitted["job_id"]

    # The worker's spans are in the same trace through the traceparent stored with the job.
    run = by_name["job.run faulty/qpu"][0]
    assert run["parent"] == admission["span_id"] and "job.queue_wait" in by_name
    attempts = sorted(by_name["provider.submit"], key=lambda s: s["attributes"]["qpu_gateway.attempt"])
    assert [s["attributes"]["qpu_gateway.attempt"] for s in attempts] == [1, 2, 3]
    assert all(s["parent"] == run["span_id"] for s in attempts)
    assert [s["attributes"].get("error.type") for s in attempts] == ["transient", "transient", None]
    assert [s["attributes"].get("qpu_gateway.provider.code") for s in attempts] == ["http_503", "http_503", None]
    assert [s["status"] for s in attempts] == [2, 2, 0]  # ERROR, ERROR, UNSET
    assert by_name["job.settle"][0]["parent"] == run["span_id"]
    # No span names or attributes carry the agent's key.
    assert alice_key not in repr(receiver.spans)


async def test_traces_turned_off_by_the_otel_variables_send_nothing(
    config: Config, alice_key: str, receiver: Receiver
) -> None:
    server = start_http_server(
        config,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
        OTEL_TRACES_EXPORTER="none",  # an endpoint is set, but the operator said none
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    try:
        async with http_client(server.url, alice_key) as client:
            submitted = body(await client.call_tool("submit_job", {"circuit": BELL2}))
            await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]})
    finally:
        server.stop()
    await anyio.sleep(0.2)
    assert receiver.spans == []
