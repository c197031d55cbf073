"""Every process's counters in the database, so one exporter can expose them all.

An installation of stdio servers has one process per client session and nothing long-lived to
scrape. Each process writes its counters and histograms (a snapshot: cumulative since it
started) to `metric_snapshots` when they changed, and at least every `REFRESH_S`;
`qpu-gateway metrics serve` sums the rows. A process gone for `RETIRE_AFTER_S` (no live row in
`processes`, no snapshot since) has its row added into the retired row, so totals never go down
and the table holds about one row per live process. Gauges (breaker states) are this process's
view of now: they are taken from live processes only (the highest value) and never retired.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, Metric

from qpu_gateway.store import Store, StoreError
from qpu_gateway.store.records import RETIRED_METRICS, MetricSnapshot, ProcessReport

log = logging.getLogger(__name__)

PUBLISH_S = 5.0  # how often a process looks whether its counters changed
REFRESH_S = 60.0  # ... and writes them anyway: the exporter's staleness check
RETIRE_AFTER_S = 120.0  # a row this old, of no live process, is added into the retired row
# A sample: [sample name, labels, value]. A family: {"type", "help", "samples"}.
Samples = dict[str, dict[str, Any]]


def snapshot(registry: CollectorRegistry) -> Samples:
    """The registry's counters, histograms and gauges, without the `_created` timestamps."""
    families: Samples = {}
    for metric in registry.collect():
        if metric.type not in ("counter", "histogram", "gauge"):
            continue
        samples = [[s.name, dict(s.labels), s.value] for s in metric.samples if not s.name.endswith("_created")]
        families[metric.name] = {"type": metric.type, "help": metric.documentation, "samples": samples}
    return families


def merge(snapshots: Iterable[str]) -> str:
    """The sum of JSON snapshots' counters and histograms (gauges dropped): the retired row's content."""
    return json.dumps(_sum([json.loads(text) for text in snapshots], gauges=False), sort_keys=True)


def _sum(parts: list[Samples], *, gauges: bool) -> Samples:
    out: Samples = {}
    values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for part in parts:
        for name, family in part.items():
            kind = family.get("type")
            if kind == "gauge" and not gauges:
                continue
            out.setdefault(name, {"type": kind, "help": family.get("help", ""), "samples": []})
            for sample_name, labels, value in family.get("samples", []):
                key = (name, str(sample_name), tuple(sorted((str(k), str(v)) for k, v in labels.items())))
                if kind == "gauge":
                    values[key] = max(values.get(key, float("-inf")), float(value))
                else:
                    values[key] = values.get(key, 0.0) + float(value)
    for (name, sample_name, labels), value in sorted(values.items()):
        out[name]["samples"].append([sample_name, dict(labels), value])
    return out


def families(rows: list[MetricSnapshot], *, live: Iterable[str]) -> list[Metric]:
    """The metric families summed over every process's row and the retired row."""
    alive = set(live)
    parts: list[Samples] = []
    gauges: list[Samples] = []
    for row in rows:
        try:
            part = json.loads(row.samples)
        except ValueError:
            log.warning("skipping an unreadable metrics snapshot", extra={"owner": row.owner})
            continue
        parts.append(part)
        if row.owner in alive:
            gauges.append({n: f for n, f in part.items() if f.get("type") == "gauge"})
    counted = _sum(parts, gauges=False)
    counted.update(_sum(gauges, gauges=True))
    metrics = []
    for name, family in sorted(counted.items()):
        metric = Metric(name, family["help"], family["type"])
        for sample_name, labels, value in family["samples"]:
            metric.add_sample(sample_name, labels, value)
        metrics.append(metric)
    return metrics


class Publisher:
    """Writes this process's snapshot when it changed (at least every REFRESH_S), and retires the
    rows of processes gone; a final write at exit."""

    def __init__(self, store: Store, registry: CollectorRegistry, owner: str) -> None:
        self.store = store
        self.registry = registry
        self.owner = owner
        self._last = ""
        self._written_at = 0.0
        self._retired_at = 0.0

    async def run(self) -> None:
        try:
            while True:
                await self.publish()
                await anyio.sleep(PUBLISH_S)
        finally:
            with anyio.CancelScope(shield=True):
                await self.publish(force=True)

    async def publish(self, *, force: bool = False) -> None:
        now = time.time()
        text = json.dumps(snapshot(self.registry), sort_keys=True)
        try:
            if force or text != self._last or now - self._written_at >= REFRESH_S:
                await self.store.publish_metrics(self.owner, text, now)
                self._last, self._written_at = text, now
            if now - self._retired_at >= REFRESH_S:
                self._retired_at = now
                await retire(self.store, now)
        except StoreError as exc:
            log.info("cannot write this process's metrics: %s", exc)


async def retire(store: Store, now: float, seen: Iterable[ProcessReport] | None = None) -> int:
    """Add the rows of processes gone for RETIRE_AFTER_S into the retired row; how many. `seen`:
    the processes reported since now - RETIRE_AFTER_S, when the caller has read them already."""
    if seen is None:
        seen = await store.processes(now - RETIRE_AFTER_S)
    return await store.retire_metrics(now - RETIRE_AFTER_S, [p.id for p in seen], merge, now)


__all__ = ["REFRESH_S", "RETIRED_METRICS", "RETIRE_AFTER_S", "Publisher", "families", "merge", "retire", "snapshot"]
