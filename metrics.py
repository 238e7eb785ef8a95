"""GET /metrics: the service's metrics in Prometheus' text format (prometheus_client), one registry per app.

Measured as requests run (histograms and counters):
    grounded_sam_request_seconds{route, kind, status}   every request's latency; kind: click, prompt, batch (what
                                                         the scheduler ran it as), or "" for requests without a model
    grounded_sam_queue_wait_seconds{kind}                how long a model pass waited for the scheduler's slot
    grounded_sam_model_pass_seconds{model, kind}         each model pass (model: detector, segmenter)
    grounded_sam_setups_total, _webhooks_total, _predicted_tasks_total, _jobs_submitted_total, _errors_total{status}
Read at each scrape (the scheduler's, the cache's and the jobs' own state):
    grounded_sam_queue_admitted{kind}, grounded_sam_queue_waiting{kind}, grounded_sam_model_passes_running
    grounded_sam_request_refused_total{reason}           refusals and drops (deadline, queue full, client gone, ...)
    grounded_sam_cache_{hits,misses,evictions}_total, grounded_sam_cache_{bytes,max_bytes,entries}
    grounded_sam_job_tasks{status}, grounded_sam_jobs{state}
    grounded_sam_gpu_memory_{allocated,reserved}_bytes   on CUDA
    grounded_sam_heap_{in_use,free}_bytes, _trims_total  glibc's malloc: allocated, freed but kept, trims (heap.py)
    process_resident_memory_bytes, process_cpu_seconds_total, ...   (prometheus_client's process collector)

Each gunicorn worker has its own: with WORKERS > 1 a scrape sees one worker's (docs/team.md).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import heap
from scheduler import FOREGROUND, KINDS, Scheduler

# Seconds: from a cached click (milliseconds) to a Retrieve Predictions near Label Studio's 100 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 90, 120)


class ServiceMetrics:
    """The app's Prometheus registry and the instruments the HTTP layer and the scheduler record into.

    scheduler: the worker's (its queue and refusals); cache_stats: () -> the embedding cache's stats dict, or None
    while the models load; job_totals: () -> {"jobs_<state>": n, "job_tasks_<status>": n}."""

    def __init__(self, scheduler: Scheduler | None = None, cache_stats: Callable[[], dict | None] = lambda: None,
                 job_totals: Callable[[], dict] = dict):
        self.registry = registry = CollectorRegistry()
        self.requests = Histogram("grounded_sam_request_seconds", "Requests by route, scheduler kind and status",
                                  ["route", "kind", "status"], buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("grounded_sam_queue_wait_seconds", "Wait of a model pass for the scheduler",
                                    ["kind"], buckets=LATENCY_BUCKETS, registry=registry)
        self.model_pass = Histogram("grounded_sam_model_pass_seconds", "Model passes by model and request kind",
                                    ["model", "kind"], buckets=LATENCY_BUCKETS, registry=registry)
        self.setups = Counter("grounded_sam_setups", "POST /setup calls answered", registry=registry)
        self.webhooks = Counter("grounded_sam_webhooks", "POST /webhook calls answered", registry=registry)
        self.predicted_tasks = Counter("grounded_sam_predicted_tasks", "Tasks answered by /predict",
                                       registry=registry)
        self.jobs_submitted = Counter("grounded_sam_jobs_submitted", "Bulk jobs submitted by POST /jobs",
                                      registry=registry)
        self.errors = Counter("grounded_sam_errors", "Error answers by status", ["status"], registry=registry)
        ProcessCollector(registry=registry)
        registry.register(_StateCollector(scheduler, cache_stats, job_totals))
        if scheduler is not None:
            scheduler.on_pass = self.record_pass

    def record_pass(self, model: str, kind: str, waited: float, seconds: float) -> None:
        self.queue_wait.labels(kind).observe(waited)
        self.model_pass.labels(model, kind).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges and counters read from their owners at each scrape."""

    def __init__(self, scheduler, cache_stats, job_totals):
        self.scheduler, self.cache_stats, self.job_totals = scheduler, cache_stats, job_totals

    def collect(self):
        if self.scheduler is not None:
            state = self.scheduler.snapshot()
            admitted = GaugeMetricFamily("grounded_sam_queue_admitted", "Requests admitted, not yet answered",
                                         labels=["kind"])
            waiting = GaugeMetricFamily("grounded_sam_queue_waiting", "Model passes waiting for a slot",
                                        labels=["kind"])
            for kind in FOREGROUND:
                admitted.add_metric([kind], state["admitted"][kind])
            for kind in KINDS:
                waiting.add_metric([kind], state["waiting"][kind])
            refused = CounterMetricFamily("grounded_sam_request_refused", "Requests refused (503) or dropped",
                                          labels=["reason"])
            for reason, n in state["refused"].items():
                refused.add_metric([reason], n)
            yield from (admitted, waiting, refused)
            yield GaugeMetricFamily("grounded_sam_model_passes_running", "Model passes running", state["running"])
        cache = self.cache_stats()
        if cache is not None:
            for name in ("hits", "misses", "evictions"):
                yield CounterMetricFamily(f"grounded_sam_cache_{name}", f"Embedding cache {name}", cache[name])
            yield GaugeMetricFamily("grounded_sam_cache_bytes", "Bytes held by the cache", cache["bytes"])
            yield GaugeMetricFamily("grounded_sam_cache_max_bytes", "The cache's bound (EMBEDDING_CACHE_MB)",
                                    cache["max_bytes"])
            yield GaugeMetricFamily("grounded_sam_cache_entries", "Entries held by the cache", cache["entries"])
        totals = self.job_totals()
        jobs = GaugeMetricFamily("grounded_sam_jobs", "Bulk jobs by state", labels=["state"])
        tasks = GaugeMetricFamily("grounded_sam_job_tasks", "Bulk jobs' tasks by status", labels=["status"])
        for key, n in totals.items():
            if key.startswith("job_tasks_"):
                tasks.add_metric([key.removeprefix("job_tasks_")], n)
            elif key.startswith("jobs_"):
                jobs.add_metric([key.removeprefix("jobs_")], n)
        yield from (jobs, tasks)
        yield from _gpu_memory()
        counts = heap.heap_stats()
        if counts is not None:
            yield GaugeMetricFamily("grounded_sam_heap_in_use_bytes", "malloc'd and not freed (glibc mallinfo2)",
                                    counts["in_use"])
            yield GaugeMetricFamily("grounded_sam_heap_free_bytes", "Free in malloc's arenas (trimmed or not)",
                                    counts["free"])
            yield CounterMetricFamily("grounded_sam_heap_trims",
                                      "malloc_trim calls (after each quiet MALLOC_TRIM_INTERVAL)", heap.trims)


def _gpu_memory():
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        yield GaugeMetricFamily("grounded_sam_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated()",
                                torch.cuda.memory_allocated())
        yield GaugeMetricFamily("grounded_sam_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved()",
                                torch.cuda.memory_reserved())
