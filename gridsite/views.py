from django.contrib.auth.decorators import login_required
from django.db.models import Count, Q
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from apps.inference.models import InferenceJob, Model
from apps.registry.models import Node


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    nodes = Node.objects.annotate(ready=Count("placements", filter=Q(placements__status="ready")))
    context = {
        "nodes": nodes,
        "models": Model.objects.prefetch_related("placements__node"),
        "jobs": InferenceJob.objects.select_related("model", "node")[:50],
    }
    return render(request, "dashboard.html", context)
