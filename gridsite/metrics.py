"""Prometheus metrics for the gateway, served at GET /metrics.

Counters and histograms live in the memory of the process that observed them,
so each gateway process reports only the requests, failovers and heartbeats it
handled. Scrape every process (one target per port) and add them up in PromQL
with ``sum without (instance)``. The gauges (nodes, placements, queue
depth) are computed at scrape time from PostgreSQL and Redis, so every process
reports the same values for them: use ``max`` across processes, not ``sum``.
"""

from __future__ import annotations

import hmac
import logging
import threading

import redis
from django.conf import settings
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Seconds. The fast end covers a relayed request to a small model (a few ms),
# the slow end a request that waits out a failover.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Model ids are chosen by users, so one process labels at most this many
# distinct models; later ones share the label "other". Unknown ids (404s)
# are labelled "unknown".
MAX_MODEL_LABELS = 100
OTHER = "other"
UNKNOWN = "unknown"

REQUEST_SECONDS = Histogram(
    "grid_inference_request_seconds",
    "Time to answer POST /api/models/{model_id}/infer/, from the view's start to the response.",
    ["model", "status"],
    buckets=LATENCY_BUCKETS,
)
JOB_SECONDS = Histogram(
    "grid_inference_job_seconds",
    "Time from dispatching an inference job to its outcome, failovers included.",
    ["model", "outcome"],
    buckets=LATENCY_BUCKETS,
)
FAILOVERS = Counter("grid_job_failovers_total", "Inference jobs moved from a failed node to another replica.")
HEARTBEAT_LAG = Histogram(
    "grid_heartbeat_lag_seconds",
    "Delay between an agent sending a heartbeat (its sent_at clock) and this gateway receiving it.",
    buckets=LAG_BUCKETS,
)

_labels_lock = threading.Lock()
_model_labels: set[str] = set()


def model_label(model_id: str) -> str:
    """Return the label for ``model_id``, keeping the label set bounded."""
    if model_id in _model_labels:
        return model_id
    with _labels_lock:
        if len(_model_labels) >= MAX_MODEL_LABELS:
            return OTHER
        _model_labels.add(model_id)
    return model_id


def observe_request(model_id: str, status: int, seconds: float) -> None:
    label = UNKNOWN if status == 404 else model_label(model_id)
    REQUEST_SECONDS.labels(model=label, status=str(status)).observe(seconds)


def observe_job(model_id: str, outcome: str, seconds: float) -> None:
    JOB_SECONDS.labels(model=model_label(model_id), outcome=outcome).observe(seconds)


def observe_heartbeat(sent_at: object, received_at: float) -> None:
    """Record heartbeat lag; skips a missing or non-numeric ``sent_at``.

    The lag includes any clock difference between the agent and the gateway,
    so a negative value (agent clock ahead) is counted as 0.
    """
    if isinstance(sent_at, (int, float)) and not isinstance(sent_at, bool):
        HEARTBEAT_LAG.observe(max(0.0, received_at - float(sent_at)))


class StateCollector(Collector):
    """Gauges read from PostgreSQL and Redis at each scrape: two queries and one LLEN."""

    def describe(self):
        # Without this, registering the collector would run collect(), and its
        # queries, at import time.
        return []

    def collect(self):
        from apps.inference.models import Placement
        from apps.registry.models import Node

        nodes = GaugeMetricFamily("grid_nodes", "Nodes by status.", labels=["status"])
        counts = dict(Node.objects.values_list("status").annotate(n=Count("pk")))
        for status in Node.Status.values:
            nodes.add_metric([status], counts.get(status, 0))
        yield nodes

        placements = GaugeMetricFamily("grid_placements", "Model replicas by placement state.", labels=["state"])
        counts = dict(Placement.objects.values_list("status").annotate(n=Count("pk")))
        for state in Placement.Status.values:
            placements.add_metric([state], counts.get(state, 0))
        yield placements

        depth = celery_queue_depth()
        if depth is not None:
            yield GaugeMetricFamily("grid_celery_queue_depth", "Tasks waiting in the Celery queue.", value=depth)


_broker: redis.Redis | None = None


def celery_queue_depth() -> int | None:
    """Return LLEN of Celery's default queue, or None when the broker is not Redis or is down.

    Counts only the list named CELERY_TASK_DEFAULT_QUEUE, which contains the
    tasks of the default priority. Grid sends no task with a priority.
    """
    global _broker
    url = settings.CELERY_BROKER_URL
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    if _broker is None:
        _broker = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return int(_broker.llen(settings.CELERY_TASK_DEFAULT_QUEUE))
    except redis.RedisError as exc:
        logger.warning("metrics: could not read the Celery queue depth from the broker: %s", exc)
        return None


REGISTRY.register(StateCollector())


def metrics(request: HttpRequest) -> HttpResponse:
    """Serve every metric in the Prometheus text format.

    A plain (synchronous) view: Django runs it in a thread, where the
    collectors' queries may block.
    """
    # Imported here: dispatch imports this module, and gridsite.errors pulls in
    # DRF's settings, whose permission classes import gridsite.errors again.
    from gridsite.errors import ApiError

    token = settings.GRID["METRICS_TOKEN"]
    sent = request.headers.get("Authorization", "")
    if token and not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return ApiError(401, "unauthenticated", "send the metrics token in the header 'Authorization: Bearer <token>'").response()
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
