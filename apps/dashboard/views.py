"""The dashboard's pages. Every page needs a logged-in user; actions are in actions.py.

A page with a live region renders only that region when asked with
``?fragment=1``; dashboard.js fetches it after a node event or on a timer.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone

from apps.dashboard import panels, selectors
from apps.dashboard.forms import JobFilterForm, TagSearchForm
from apps.inference.models import InferenceJob, Placement
from apps.registry.models import Node

JOBS_PER_PAGE = 50
RECENT_JOBS = 10


def render_live(
    request: HttpRequest, page: str, fragment: str, context: dict[str, Any]
) -> HttpResponse:
    """Render the whole page, or only its live region for ``?fragment=1``."""
    if request.GET.get("fragment"):
        response = render(request, fragment, context)
        # dashboard.js replaces a region only with a response carrying this
        # header, never with the login page an expired session redirects to.
        response["X-Grid-Fragment"] = "1"
        response["Cache-Control"] = "no-store"
        return response
    return render(request, page, context)


@login_required
def overview(request: HttpRequest) -> HttpResponse:
    now = timezone.now()
    summary = selectors.summary(now=now)
    context = {
        "summary": summary,
        "latency_chart": panels.latency_over_time(now=now),
        "status_chart": panels.jobs_by_status(summary.jobs_by_status),
    }
    return render_live(
        request, "dashboard/overview.html", "dashboard/_summary.html", context
    )


@login_required
def nodes(request: HttpRequest) -> HttpResponse:
    context = {"nodes": selectors.nodes_for_list()}
    return render_live(
        request, "dashboard/nodes.html", "dashboard/_node_table.html", context
    )


@login_required
def node_detail(request: HttpRequest, node_id: int) -> HttpResponse:
    node = get_object_or_404(Node, pk=node_id)
    heartbeat_chart, load_chart = panels.heartbeat_timeline(node.pk)
    context = {
        "node": node,
        "heartbeat_chart": heartbeat_chart,
        "load_chart": load_chart,
        "placements": Placement.objects.filter(node=node)
        .select_related("model")
        .order_by("model__model_id"),
        "datasets": node.datasets.order_by("name"),
        "mismatches": node.verification_mismatches or [],
        "jobs": selectors.jobs(node_id=node.pk)[:RECENT_JOBS],
    }
    return render_live(
        request, "dashboard/node_detail.html", "dashboard/_node_status.html", context
    )


@login_required
def models(request: HttpRequest) -> HttpResponse:
    context = {"rows": selectors.model_rows(now=timezone.now())}
    return render_live(
        request, "dashboard/models.html", "dashboard/_model_table.html", context
    )


@login_required
def model_detail(request: HttpRequest, model_id: str) -> HttpResponse:
    now = timezone.now()
    found = selectors.models_with_placements().filter(model_id=model_id)
    rows = selectors.model_rows(now=now, models=found)
    if not rows:
        raise Http404(f"model {model_id!r} not found")
    row = rows[0]
    context = {
        "row": row,
        "model": row.model,
        "histogram": panels.latency_histogram(
            model_pk=row.model.pk, since=now - dt.timedelta(hours=1)
        ),
        "jobs": selectors.jobs(model_id=row.model.model_id)[:RECENT_JOBS],
    }
    return render_live(
        request,
        "dashboard/model_detail.html",
        "dashboard/_model_replicas.html",
        context,
    )


@login_required
def jobs(request: HttpRequest) -> HttpResponse:
    form = JobFilterForm(request.GET or None)
    filters: dict[str, Any] = {}
    if form.is_bound and form.is_valid():
        data = form.cleaned_data
        filters = {
            "status": data["status"],
            "model_id": data["model"],
            "node_id": data["node"],
            "failovers_only": data["failovers"],
        }
    page = Paginator(selectors.jobs(**filters), JOBS_PER_PAGE).get_page(
        request.GET.get("page")
    )
    context = {"form": form, "page": page, "statuses": InferenceJob.Status}
    return render(request, "dashboard/jobs.html", context)


@login_required
def search(request: HttpRequest) -> HttpResponse:
    form = TagSearchForm(request.GET or None)
    datasets = None
    if form.is_bound and form.is_valid() and form.cleaned_data["tags"]:
        datasets = selectors.datasets_with_tags(
            form.cleaned_data["tags"],
            include_offline=form.cleaned_data["include_offline"],
        )
    context = {"form": form, "datasets": datasets, "tags": selectors.tag_counts()}
    return render(request, "dashboard/search.html", context)
