"""OpenTelemetry traces: off unless the standard OTEL_* variables ask for them, and free when off.

The MCP SDK already wraps every inbound call in a server span with the semantic-convention names
(`mcp.method.name`, `gen_ai.tool.name`, `error.type`, `jsonrpc.request.id`), continuing a
client's `_meta.traceparent`. This module turns recording on (`configure`: an SDK tracer provider
exporting OTLP/HTTP, as the OTEL_* variables say) and adds the job's own spans: admission inside
the submit_job call; then, in whichever process or replica runs the job, one `job.run` span per
claim, a child of the submitting call (its traceparent is stored in the job's row), holding the
queue wait, each provider call (`provider.submit`, `provider.status` for every poll, ...; a
retried call is one span per attempt, with its error class and provider code) and the settle.

Turned on by `OTEL_TRACES_EXPORTER=otlp` or an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
keep it off. Everything else (service name, resource attributes, headers, sampler, batch delay)
is the SDK's own handling of the variables. Off, every helper here returns before touching the API.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from qpu_gateway.store.records import JobRecord

log = logging.getLogger(__name__)

TRACER_NAME = "qpu-gateway"
_state: dict[str, Any] = {"on": False, "provider": None}


def wanted(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter in ("none", ""):
        return exporter == "" and bool(
            environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
    return "otlp" in exporter.split(",")


def enabled() -> bool:
    return bool(_state["on"])


def configure() -> bool:
    """Start recording and exporting spans if the environment asks; True when on. Once per process."""
    if _state["on"] or not wanted():
        return bool(_state["on"])
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not installed here; traces go over http/protobuf", protocol)
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is the default name.
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "qpu-gateway"})
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _state.update(on=True, provider=provider)
    log.info(
        "traces on: OTLP/HTTP to %s",
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318"),
    )
    return True


def shutdown() -> None:
    """Send the spans still buffered (at exit)."""
    provider = _state["provider"]
    if provider is not None:
        provider.shutdown()
        _state.update(on=False, provider=None)


def current_traceparent() -> str | None:
    """The W3C traceparent of the span now current (the submitting call's), to store with a job."""
    if not _state["on"]:
        return None
    from opentelemetry.propagate import inject

    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier.get("traceparent")


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer(TRACER_NAME)


class _Span:
    """A span, or nothing when traces are off: the worker's calls read the same either way."""

    def __init__(self, span: Any = None) -> None:
        self.span = span

    def set(self, **attributes: Any) -> None:
        if self.span is not None:
            self.span.set_attributes({k.replace("__", "."): v for k, v in attributes.items() if v is not None})

    def failed(self, kind: str, code: str | None) -> None:
        """A provider call that failed: its error class, and the provider's code where it gave one."""
        if self.span is None:
            return
        from opentelemetry.trace import StatusCode

        self.set(error__type=kind, qpu_gateway__provider__code=code)
        self.span.set_status(StatusCode.ERROR, f"{kind}{' ' + code if code else ''}")


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[_Span]:
    """A child of the current span (nothing when off)."""
    if not _state["on"]:
        yield _Span()
        return
    with _tracer().start_as_current_span(name, record_exception=False) as current:
        wrapped = _Span(current)
        wrapped.set(**attributes)
        yield wrapped


def _job_attributes(job: JobRecord) -> dict[str, Any]:
    return {
        "qpu_gateway__job__id": job.id,
        "qpu_gateway__backend": job.backend,
        "qpu_gateway__agent": job.agent,
        "qpu_gateway__project": job.project,
        "qpu_gateway__shots": job.shots,
    }


@contextlib.contextmanager
def job_run(job: JobRecord, claimed_at: float) -> Iterator[_Span]:
    """One run of a job by a worker here: a child of the call that submitted it, wherever that was,
    with the job's wait in the queue before it as a span of its own."""
    if not _state["on"]:
        yield _Span()
        return
    from opentelemetry.propagate import extract

    parent = extract({"traceparent": job.trace_parent}) if job.trace_parent else None
    tracer = _tracer()
    if job.runs == 1:
        entered = job.queued_at if job.queued_at is not None else job.created_at
        wait = tracer.start_span("job.queue_wait", context=parent, start_time=int(entered * 1e9))
        _Span(wait).set(**_job_attributes(job))
        wait.end(end_time=int(max(claimed_at, entered) * 1e9))
    with tracer.start_as_current_span(f"job.run {job.backend}", context=parent, record_exception=False) as current:
        wrapped = _Span(current)
        wrapped.set(**_job_attributes(job), qpu_gateway__job__run=job.runs)
        yield wrapped


def provider_span(job: JobRecord, call: str, attempt: int) -> contextlib.AbstractContextManager[_Span]:
    """One call to the job's provider (one attempt of it)."""
    if not _state["on"]:
        return contextlib.nullcontext(_Span())
    return span(
        f"provider.{call}",
        qpu_gateway__provider=job.backend.partition("/")[0],
        qpu_gateway__backend=job.backend,
        qpu_gateway__attempt=attempt,
    )
