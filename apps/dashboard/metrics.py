"""Request rates, latencies and failovers, computed from InferenceJob rows.

A job's latency runs from its creation to its end (``created`` to
``finished``), so it includes queueing, every failover attempt and the
transfer of the result. Only succeeded jobs count towards latency. A job with
more than one attempt was failed over at least once. Every query filters on
``created``, which is indexed, so it reads only the jobs in its window.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.contrib.postgres.fields import ArrayField
from django.db.models import (
    Aggregate,
    Count,
    DurationField,
    ExpressionWrapper,
    F,
    FloatField,
    Func,
    IntegerField,
    QuerySet,
    Value,
)
from django.db.models.functions import Trunc

from apps.inference.models import InferenceJob

# Upper edges, in milliseconds, of the latency histogram's buckets; the last
# bucket contains everything slower.
HISTOGRAM_EDGES_MS = [5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


class Percentiles(Aggregate):
    """PostgreSQL's ``percentile_cont`` for the median and the 99th percentile."""

    function = "percentile_cont"
    template = "%(function)s(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = ArrayField(FloatField())


class EpochMilliseconds(Func):
    """An interval as a number of milliseconds."""

    template = "(EXTRACT(EPOCH FROM %(expressions)s)::double precision * 1000)"
    output_field = FloatField()


def latency_ms() -> EpochMilliseconds:
    return EpochMilliseconds(
        ExpressionWrapper(F("finished") - F("created"), output_field=DurationField())
    )


@dataclass(frozen=True)
class Latency:
    """Latency percentiles in milliseconds; None when no job finished in the window."""

    p50: float | None
    p99: float | None
    count: int


def _jobs(since: dt.datetime, model_pk: int | None) -> QuerySet[InferenceJob]:
    jobs = InferenceJob.objects.filter(created__gte=since)
    if model_pk is not None:
        jobs = jobs.filter(model_id=model_pk)
    return jobs


def _succeeded(since: dt.datetime, model_pk: int | None) -> QuerySet[InferenceJob]:
    return _jobs(since, model_pk).filter(
        status=InferenceJob.Status.SUCCEEDED, finished__isnull=False
    )


def latency(*, since: dt.datetime, model_pk: int | None = None) -> Latency:
    """p50 and p99 latency of the jobs created since ``since``. One query."""
    row = _succeeded(since, model_pk).aggregate(
        percentiles=Percentiles(latency_ms()), count=Count("pk")
    )
    p50, p99 = row["percentiles"] or (None, None)
    return Latency(p50, p99, row["count"])


def request_rate(
    *, now: dt.datetime, seconds: int = 60, model_pk: int | None = None
) -> float:
    """Jobs created per second over the last ``seconds`` seconds."""
    count = _jobs(now - dt.timedelta(seconds=seconds), model_pk).count()
    return count / seconds


def request_rates_by_model(*, now: dt.datetime, seconds: int = 60) -> dict[int, float]:
    """Model pk -> jobs created per second over the last ``seconds`` seconds."""
    rows = (
        _jobs(now - dt.timedelta(seconds=seconds), None)
        .values("model_id")
        .annotate(count=Count("pk"))
    )
    return {row["model_id"]: row["count"] / seconds for row in rows}


def failovers(*, since: dt.datetime) -> int:
    """Jobs created since ``since`` that moved to another node at least once."""
    return _jobs(since, None).filter(attempts__gt=1).count()


def jobs_by_status(*, since: dt.datetime) -> dict[str, int]:
    """Status -> jobs created since ``since``, with every status present."""
    counts = dict.fromkeys(InferenceJob.Status.values, 0)
    for row in _jobs(since, None).values("status").annotate(count=Count("pk")):
        counts[row["status"]] = row["count"]
    return counts


@dataclass(frozen=True)
class MinuteLatency:
    """Latency of the jobs that finished within one minute."""

    minute: dt.datetime
    p50: float | None
    p99: float | None
    count: int


def latency_by_minute(*, now: dt.datetime, minutes: int = 60) -> list[MinuteLatency]:
    """Per-minute latency over the last ``minutes`` minutes, oldest first, gaps as None."""
    first = (now - dt.timedelta(minutes=minutes - 1)).replace(second=0, microsecond=0)
    rows = (
        _succeeded(first, None)
        .annotate(minute=Trunc("finished", "minute", tzinfo=dt.UTC))
        .values("minute")
        .annotate(percentiles=Percentiles(latency_ms()), count=Count("pk"))
    )
    by_minute = {row["minute"]: row for row in rows}
    timeline = []
    for step in range(minutes):
        minute = first + dt.timedelta(minutes=step)
        row = by_minute.get(minute)
        if row is None:
            timeline.append(MinuteLatency(minute, None, None, 0))
        else:
            p50, p99 = row["percentiles"]
            timeline.append(MinuteLatency(minute, p50, p99, row["count"]))
    return timeline


def latency_histogram(
    *, since: dt.datetime, model_pk: int | None = None
) -> list[tuple[str, int]]:
    """(bucket label, job count) for the latency of jobs created since ``since``. One query."""
    edges = Value(
        [float(edge) for edge in HISTOGRAM_EDGES_MS],
        output_field=ArrayField(FloatField()),
    )
    bucket = Func(
        latency_ms(), edges, function="width_bucket", output_field=IntegerField()
    )
    rows = (
        _succeeded(since, model_pk)
        .annotate(bucket=bucket)
        .values("bucket")
        .annotate(count=Count("pk"))
    )
    counts = {row["bucket"]: row["count"] for row in rows}
    labels = [f"<{_format_ms(edge)}" for edge in HISTOGRAM_EDGES_MS]
    labels.append(f"≥{_format_ms(HISTOGRAM_EDGES_MS[-1])}")
    # width_bucket returns 0 below the first edge and len(edges) at or above the last.
    return [(label, counts.get(index, 0)) for index, label in enumerate(labels)]


def _format_ms(value: float) -> str:
    # No space before the unit: the histogram fits twelve of these side by side.
    return f"{value / 1000:g}s" if value >= 1000 else f"{value:g}ms"
