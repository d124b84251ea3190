"""Admin pages for nodes and datasets. Node actions go through apps.registry.operations."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from apps.registry import operations
from apps.registry.models import Dataset, Node


def _actor(request: HttpRequest) -> str:
    return f"user {request.user.pk} ({request.user.get_username()}) in the admin"


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "status",
        "last_heartbeat",
        "in_flight",
        "concurrency",
        "protocol_version",
        "token_revoked",
    )
    list_filter = ("status", "token_revoked")
    search_fields = ("name",)
    readonly_fields = (
        "token_hash",
        "status",
        "last_heartbeat",
        "connected_since",
        "protocol_version",
        "capabilities",
        "concurrency",
        "in_flight",
        "verification_mismatches",
        "created",
    )
    actions = ("drain", "resume", "disconnect")

    def has_add_permission(self, request: HttpRequest) -> bool:
        # A node's token is shown once when it is created, which only
        # `manage.py createnode NAME` does.
        return False

    @admin.action(description="Drain selected nodes", permissions=["change"])
    def drain(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        drained = [
            node.name
            for node in queryset
            if operations.drain_node(node_id=node.pk, actor=_actor(request))
        ]
        self.message_user(
            request,
            f"Draining {len(drained)} of {queryset.count()} selected nodes; only online nodes drain.",
        )

    @admin.action(description="Resume selected draining nodes", permissions=["change"])
    def resume(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        resumed = [
            node.name
            for node in queryset
            if operations.resume_node(node_id=node.pk, actor=_actor(request))
        ]
        self.message_user(
            request,
            f"Resumed {len(resumed)} of {queryset.count()} selected nodes; only draining nodes resume.",
        )

    @admin.action(description="Disconnect selected nodes", permissions=["change"])
    def disconnect(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        count = 0
        for node in queryset.exclude(status=Node.Status.OFFLINE):
            operations.disconnect_node(node_id=node.pk, actor=_actor(request))
            count += 1
        self.message_user(
            request, f"Asked {count} nodes to disconnect.", messages.SUCCESS
        )


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ("name", "node", "tag_list", "rows", "updated")
    list_filter = ("node",)
    list_select_related = ("node",)
    search_fields = ("name", "description", "node__name")
    readonly_fields = ("updated",)

    @admin.display(description="tags")
    def tag_list(self, dataset: Dataset) -> str:
        return ", ".join(dataset.tags)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Dataset], search_term: str
    ):
        """Also match datasets carrying the search term as a whole tag."""
        results, may_have_duplicates = super().get_search_results(
            request, queryset, search_term
        )
        term = search_term.strip()
        if term:
            results |= queryset.filter(tags__contains=[term])
        return results, may_have_duplicates
