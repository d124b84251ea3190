"""Admin page for API tokens. Tokens are issued by `manage.py createtoken`."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from apps.accounts.models import ApiToken


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = (
        "name",
        "user",
        "prefix",
        "scopes",
        "created",
        "expires",
        "revoked",
        "last_used",
    )
    list_filter = (("revoked", admin.EmptyFieldListFilter), "created")
    list_select_related = ("user",)
    search_fields = ("name", "prefix", "user__username")
    readonly_fields = ("user", "token_hash", "prefix", "created", "last_used")
    actions = ("revoke",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        # The plain token is printed once when it is issued, which only
        # `manage.py createtoken` does.
        return False

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        count = queryset.filter(revoked__isnull=True).update(revoked=timezone.now())
        self.message_user(request, f"Revoked {count} tokens.")
