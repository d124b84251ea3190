"""Staff actions on nodes and models: GET shows a confirmation, POST acts.

The work itself lives in apps.registry.operations and apps.inference.operations,
which the Django admin's actions call too. Django's CSRF middleware checks
every POST.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from apps.inference import operations as model_operations
from apps.inference.models import Model
from apps.registry import operations as node_operations
from apps.registry.models import Node


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Send anonymous users to the login page and reject logged-in non-staff with 403."""

    @login_required
    @require_http_methods(["GET", "POST"])
    @functools.wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_staff:
            raise PermissionDenied("Only staff users can change nodes and models.")
        return view(request, *args, **kwargs)

    return wrapper


def actor(request: HttpRequest) -> str:
    """Who acted, for the logs."""
    return f"user {request.user.pk} ({request.user.get_username()})"


def confirm(
    request: HttpRequest,
    *,
    title: str,
    body: str,
    button: str,
    cancel: str,
    danger: bool = False,
) -> HttpResponse:
    context = {
        "title": title,
        "body": body,
        "button": button,
        "cancel": cancel,
        "danger": danger,
    }
    return render(request, "dashboard/confirm.html", context)


@staff_required
def drain_node(request: HttpRequest, node_id: int) -> HttpResponse:
    node = get_object_or_404(Node, pk=node_id)
    back = reverse("dashboard:node", args=[node.pk])
    if request.method == "POST":
        if node_operations.drain_node(node_id=node.pk, actor=actor(request)):
            messages.success(
                request,
                f"{node.name} is draining: it finishes its running jobs and gets no new ones.",
            )
        else:
            messages.warning(
                request,
                f"{node.name} was not drained because it is {node.status}, not online.",
            )
        return redirect(back)
    return confirm(
        request,
        title=f"Drain {node.name}?",
        body="The node finishes the jobs it is running and gets no new jobs or models. "
        "Its models are placed on other nodes to keep their replicas.",
        button="Drain node",
        cancel=back,
    )


@staff_required
def resume_node(request: HttpRequest, node_id: int) -> HttpResponse:
    node = get_object_or_404(Node, pk=node_id)
    back = reverse("dashboard:node", args=[node.pk])
    if request.method == "POST":
        if node_operations.resume_node(node_id=node.pk, actor=actor(request)):
            messages.success(request, f"{node.name} is back in service.")
        else:
            messages.warning(
                request,
                f"{node.name} was not resumed because it is {node.status}, not draining.",
            )
        return redirect(back)
    return confirm(
        request,
        title=f"Resume {node.name}?",
        body="The node gets new jobs and models again once its agent is connected.",
        button="Resume node",
        cancel=back,
    )


@staff_required
def disconnect_node(request: HttpRequest, node_id: int) -> HttpResponse:
    node = get_object_or_404(Node, pk=node_id)
    back = reverse("dashboard:node", args=[node.pk])
    if request.method == "POST":
        delivered = node_operations.disconnect_node(
            node_id=node.pk, actor=actor(request)
        )
        if delivered:
            messages.success(
                request, f"{node.name} was asked to disconnect and is offline."
            )
        else:
            messages.info(
                request, f"{node.name} had no connected agent; it is marked offline."
            )
        return redirect(back)
    return confirm(
        request,
        title=f"Disconnect {node.name}?",
        body="The agent is told to disconnect and stops; it does not reconnect until someone starts it again. "
        "Its running jobs move to other nodes.",
        button="Disconnect node",
        cancel=back,
        danger=True,
    )


@staff_required
def disconnect_all(request: HttpRequest) -> HttpResponse:
    back = reverse("dashboard:nodes")
    if request.method == "POST":
        count = node_operations.disconnect_all(actor=actor(request))
        messages.success(request, f"Asked {count} nodes to disconnect.")
        return redirect(back)
    connected = Node.objects.exclude(status=Node.Status.OFFLINE).count()
    return confirm(
        request,
        title=f"Disconnect all {connected} connected nodes?",
        body="Every agent is told to disconnect and stops. No model can serve requests until agents are started again.",
        button="Disconnect all nodes",
        cancel=back,
        danger=True,
    )


@staff_required
def replace_model(request: HttpRequest, model_id: str) -> HttpResponse:
    model = get_object_or_404(Model, model_id=model_id)
    back = reverse("dashboard:model", args=[model.model_id])
    if request.method == "POST":
        model_operations.replace_model(model_pk=model.pk, actor=actor(request))
        messages.success(request, f"Placement of {model.model_id} is queued.")
        return redirect(back)
    return confirm(
        request,
        title=f"Re-place {model.model_id}?",
        body="A placement pass tops the model up to its wanted replicas on online nodes. "
        "When it cannot, the model page shows why.",
        button="Re-place model",
        cancel=back,
    )


@staff_required
def delete_model(request: HttpRequest, model_id: str) -> HttpResponse:
    model = get_object_or_404(Model, model_id=model_id)
    if request.method == "POST":
        evicted = model_operations.delete_model(model_pk=model.pk, actor=actor(request))
        messages.success(
            request,
            f"Deleted {model.model_id} and evicted it from {len(evicted)} nodes.",
        )
        return redirect(reverse("dashboard:models"))
    return confirm(
        request,
        title=f"Delete {model.model_id}?",
        body="Every node holding the model evicts it, and the model and its job history are deleted. "
        "This cannot be undone.",
        button="Delete model",
        cancel=reverse("dashboard:model", args=[model.model_id]),
        danger=True,
    )
