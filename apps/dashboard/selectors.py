"""Read-only queries behind the dashboard pages."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from django.db.models import CharField, Count, F, Func, Prefetch, Q, QuerySet

from apps.dashboard import metrics
from apps.inference.models import InferenceJob, Model, Placement
from apps.inference.serializers import model_status
from apps.registry.models import Dataset, Node

HEALTHY = "healthy"
DEGRADED = "degraded"
UNAVAILABLE = "unavailable"

# Windows of the overview's headline numbers.
RATE_SECONDS = 60
LATENCY_WINDOW = dt.timedelta(minutes=5)
HOUR = dt.timedelta(hours=1)


def health(ready: int, wanted: int) -> str:
    """Classify a model by its ready replicas of the active version on online nodes.

    Healthy: every wanted replica is ready. Degraded: some are. Unavailable:
    none is, so requests fail.
    """
    if ready >= wanted:
        return HEALTHY
    return DEGRADED if ready else UNAVAILABLE


def model_health(model: Model) -> tuple[str, int]:
    """Return the model's health and ready replica count.

    Reads ``model.placements`` with their nodes, so prefetch them for lists.
    """
    ready = model_status(model)[2]
    return health(ready, model.replicas), ready


def models_with_placements() -> QuerySet[Model]:
    placements = Placement.objects.select_related("node").order_by("node__name")
    return Model.objects.select_related("owner").prefetch_related(
        Prefetch("placements", queryset=placements)
    )


@dataclass
class ModelRow:
    """A model with what the models page shows beside it."""

    model: Model
    health: str
    ready: int
    status: str
    reason: str
    rate: float
    placements: list[Placement] = field(default_factory=list)


def model_rows(
    *, now: dt.datetime, models: QuerySet[Model] | None = None
) -> list[ModelRow]:
    """Return every model with its health, placement status and request rate. Three queries."""
    rates = metrics.request_rates_by_model(now=now, seconds=RATE_SECONDS)
    rows = []
    for model in models if models is not None else models_with_placements():
        status, reason, ready = model_status(model)
        placements = list(model.placements.all())
        rows.append(
            ModelRow(
                model,
                health(ready, model.replicas),
                ready,
                status,
                reason,
                rates.get(model.pk, 0.0),
                placements,
            )
        )
    return rows


def nodes_for_list() -> QuerySet[Node]:
    """Nodes with their ready replicas, placements and datasets counted. One query."""
    return Node.objects.annotate(
        ready=Count(
            "placements",
            filter=Q(placements__status=Placement.Status.READY),
            distinct=True,
        ),
        placement_count=Count("placements", distinct=True),
        dataset_count=Count("datasets", distinct=True),
    ).order_by("name")


@dataclass(frozen=True)
class Summary:
    """The overview's headline numbers."""

    nodes: dict[str, int]
    models: dict[str, int]
    requests_per_second: float
    latency: metrics.Latency
    failovers: int
    jobs_by_status: dict[str, int]


def summary(*, now: dt.datetime) -> Summary:
    nodes = dict.fromkeys(Node.Status.values, 0)
    for row in Node.objects.values("status").annotate(count=Count("pk")):
        nodes[row["status"]] = row["count"]
    models = dict.fromkeys([HEALTHY, DEGRADED, UNAVAILABLE], 0)
    for model in models_with_placements():
        models[model_health(model)[0]] += 1
    return Summary(
        nodes=nodes,
        models=models,
        requests_per_second=metrics.request_rate(now=now, seconds=RATE_SECONDS),
        latency=metrics.latency(since=now - LATENCY_WINDOW),
        failovers=metrics.failovers(since=now - HOUR),
        jobs_by_status=metrics.jobs_by_status(since=now - HOUR),
    )


def jobs(
    *,
    status: str = "",
    model_id: str = "",
    node_id: int | None = None,
    failovers_only: bool = False,
) -> QuerySet[InferenceJob]:
    """Jobs newest first, narrowed by whichever filters are set."""
    found = InferenceJob.objects.select_related("model", "node").order_by("-created")
    if status:
        found = found.filter(status=status)
    if model_id:
        found = found.filter(model__model_id=model_id)
    if node_id is not None:
        found = found.filter(node_id=node_id)
    if failovers_only:
        found = found.filter(attempts__gt=1)
    return found


def datasets_with_tags(tags: list[str], *, include_offline: bool) -> QuerySet[Dataset]:
    """Datasets carrying every tag in ``tags``, on online nodes unless ``include_offline``."""
    found = Dataset.objects.select_related("node").filter(tags__contains=tags)
    if not include_offline:
        found = found.filter(node__status=Node.Status.ONLINE)
    return found


def tag_counts(limit: int = 200) -> list[tuple[str, int]]:
    """Return the most used dataset tags with their dataset counts. One query."""
    rows = (
        Dataset.objects.annotate(
            tag=Func(F("tags"), function="unnest", output_field=CharField())
        )
        .values("tag")
        .annotate(count=Count("pk"))
        .order_by("-count", "tag")[:limit]
    )
    return [(row["tag"], row["count"]) for row in rows]
