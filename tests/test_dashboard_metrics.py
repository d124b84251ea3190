"""Rates, latency percentiles and failovers from InferenceJob rows, and chart geometry."""

import datetime as dt

import pytest
from django.utils import timezone

from apps.dashboard import charts, metrics
from apps.inference.models import InferenceJob
from tests.dashboard_data import make_job, make_model, make_user

HOUR = dt.timedelta(hours=1)


@pytest.fixture
def model(db):
    return make_model("digits", make_user("owner"))


def test_latency_percentiles(model):
    for latency in range(1, 101):
        make_job(model, latency_ms=float(latency))
    result = metrics.latency(since=timezone.now() - HOUR)
    assert result.count == 100
    assert result.p50 == pytest.approx(50.5, abs=0.01)
    assert result.p99 == pytest.approx(99.01, abs=0.01)


def test_latency_ignores_failed_and_running(model):
    make_job(model, latency_ms=10.0)
    make_job(model, latency_ms=5000.0, status=InferenceJob.Status.FAILED)
    make_job(model, latency_ms=None, status=InferenceJob.Status.RUNNING)
    result = metrics.latency(since=timezone.now() - HOUR)
    assert result.count == 1
    assert result.p99 == pytest.approx(10.0, abs=0.01)


def test_latency_empty_window(model):
    make_job(model, age=dt.timedelta(hours=2))
    result = metrics.latency(since=timezone.now() - HOUR)
    assert result.count == 0
    assert result.p50 is None
    assert result.p99 is None


def test_request_rate_counts_last_minute(model):
    for _ in range(30):
        make_job(model, age=dt.timedelta(seconds=10))
    make_job(model, age=dt.timedelta(minutes=5))
    assert metrics.request_rate(now=timezone.now()) == pytest.approx(0.5)


def test_failovers_counts_retried_jobs(model):
    make_job(model, attempts=1)
    make_job(model, attempts=2)
    make_job(model, attempts=4, status=InferenceJob.Status.FAILED)
    make_job(model, attempts=3, age=dt.timedelta(hours=2))
    assert metrics.failovers(since=timezone.now() - HOUR) == 2


def test_jobs_by_status_fills_zeros(model):
    make_job(model)
    make_job(model, status=InferenceJob.Status.FAILED)
    make_job(model, status=InferenceJob.Status.FAILED)
    counts = metrics.jobs_by_status(since=timezone.now() - HOUR)
    assert counts == {"queued": 0, "running": 0, "succeeded": 1, "failed": 2}


def test_latency_by_minute_has_gaps(model):
    make_job(model, latency_ms=20.0, age=dt.timedelta(seconds=1))
    timeline = metrics.latency_by_minute(now=timezone.now(), minutes=10)
    assert len(timeline) == 10
    assert timeline[0].p50 is None
    assert sum(row.count for row in timeline) == 1
    assert [row.p50 for row in timeline if row.count] == [pytest.approx(20.0, abs=0.01)]


def test_histogram_buckets(model):
    for latency in (1.0, 7.0, 7.5, 300.0, 20000.0):
        make_job(model, latency_ms=latency)
    buckets = dict(
        metrics.latency_histogram(since=timezone.now() - HOUR, model_pk=model.pk)
    )
    assert buckets["<5ms"] == 1
    assert buckets["<10ms"] == 2
    assert buckets["<500ms"] == 1
    assert buckets["≥10s"] == 1
    assert sum(buckets.values()) == 5


def test_nice_ceiling():
    assert charts.nice_ceiling(0) == 5
    assert charts.nice_ceiling(7) == 10
    assert charts.nice_ceiling(1.3) == 2.5
    assert charts.nice_ceiling(230) == 250
    assert charts.nice_ceiling(5000) == 5000


def test_line_chart_splits_at_gaps():
    chart = charts.line_chart(
        title="t",
        xs=[0, 1, 2, 3, 4],
        series=[("p50", "c", [1.0, 2.0, None, 4.0, 5.0])],
        x_label=str,
        unit="ms",
    )
    line = chart.lines[0]
    assert len(line.segments) == 2
    assert line.latest == "5 ms"
    assert line.peak == "5 ms"
    assert chart.empty is False


def test_lone_point_becomes_dot():
    chart = charts.line_chart(
        title="t",
        xs=[0, 1, 2, 3],
        series=[("p50", "c", [1.0, None, 3.0, 4.0])],
        x_label=str,
        unit="",
    )
    line = chart.lines[0]
    assert len(line.segments) == 1
    # The axis tops out at 5, so 1.0 sits a fifth of the way up the plot.
    plot = charts.HEIGHT - charts.BOTTOM - charts.TOP
    assert line.dots == [
        (charts.LEFT, pytest.approx(charts.HEIGHT - charts.BOTTOM - plot / 5))
    ]


def test_edge_ticks_align_inwards():
    chart = charts.line_chart(
        title="t",
        xs=list(range(10)),
        series=[("a", "c", [1.0] * 10)],
        x_label=str,
        unit="",
    )
    anchors = [tick.anchor for tick in chart.x_ticks]
    assert anchors == ["start", "middle", "middle", "end"]
    assert [tick.label for tick in chart.x_ticks] == ["0", "3", "6", "9"]


def test_line_chart_scales_to_plot():
    chart = charts.line_chart(
        title="t", xs=[0, 10], series=[("a", "c", [0.0, 10.0])], x_label=str, unit=""
    )
    first, last = chart.lines[0].segments[0].split()
    assert first == f"{charts.LEFT:.1f},{charts.HEIGHT - charts.BOTTOM:.1f}"
    assert last == f"{charts.WIDTH - charts.RIGHT:.1f},{charts.TOP:.1f}"


def test_empty_chart_is_marked():
    chart = charts.line_chart(
        title="t", xs=[], series=[("a", "c", [])], x_label=str, unit=""
    )
    assert chart.empty is True


def test_bar_chart_heights():
    chart = charts.bar_chart(title="t", items=[("a", 5.0), ("b", 10.0)], unit="")
    plot = charts.HEIGHT - charts.BOTTOM - charts.TOP
    assert chart.bars[1].height == pytest.approx(plot)
    assert chart.bars[0].height == pytest.approx(plot / 2)
    assert chart.description == "a: 5; b: 10"


def test_format_value_seconds():
    assert charts.format_value(1500.0, "ms") == "1.5 s"
    assert charts.format_value(12.345, "ms") == "12.3 ms"
