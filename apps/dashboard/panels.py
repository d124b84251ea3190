"""Charts of the dashboard pages, built from metrics and node history."""

from __future__ import annotations

import datetime as dt

from apps.dashboard import charts, metrics
from apps.registry import history


def _clock(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, tz=dt.UTC).strftime("%H:%M")


def _clock_seconds(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, tz=dt.UTC).strftime("%H:%M:%S")


def latency_over_time(*, now: dt.datetime, minutes: int = 60) -> charts.Chart:
    timeline = metrics.latency_by_minute(now=now, minutes=minutes)
    return charts.line_chart(
        title=f"Latency per minute, last {minutes} minutes (UTC)",
        xs=[row.minute.timestamp() for row in timeline],
        series=[
            ("p50", "series-p50", [row.p50 for row in timeline]),
            ("p99", "series-p99", [row.p99 for row in timeline]),
        ],
        x_label=_clock,
        unit="ms",
    )


def jobs_by_status(counts: dict[str, int]) -> charts.Chart:
    return charts.bar_chart(
        title="Jobs by status, last hour",
        items=list(counts.items()),
        unit="",
        css=lambda status: f"bar-{status}",
    )


def heartbeat_timeline(node_id: int) -> tuple[charts.Chart, charts.Chart]:
    """Charts of the heartbeat age and the requests in flight, from the node's history."""
    samples = history.read_samples(node_id)
    xs = [sample.at for sample in samples]
    age = charts.line_chart(
        title="Seconds since the last heartbeat, at each sweep (UTC)",
        xs=xs,
        series=[
            (
                "heartbeat age",
                "series-age",
                [sample.heartbeat_age for sample in samples],
            )
        ],
        x_label=_clock_seconds,
        unit="s",
    )
    load = charts.line_chart(
        title="Requests in flight, at each sweep (UTC)",
        xs=xs,
        series=[
            (
                "in flight",
                "series-load",
                [float(sample.in_flight) for sample in samples],
            )
        ],
        x_label=_clock_seconds,
        unit="",
    )
    return age, load


def latency_histogram(*, model_pk: int, since: dt.datetime) -> charts.Chart:
    buckets = metrics.latency_histogram(since=since, model_pk=model_pk)
    return charts.bar_chart(
        title="Latency of succeeded jobs, last hour (jobs per bucket)",
        items=buckets,
        unit="",
        css=lambda label: "bar-latency",
        width=800,
    )
