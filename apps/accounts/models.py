from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from apps.accounts.tokens import hash_token, new_token


class ApiToken(models.Model):
    """A user's API token. Only the SHA-256 of the token is stored."""

    class Scope(models.TextChoices):
        READ = "read"
        INFER = "infer"
        SERVE = "serve"
        ADMIN = "admin"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    # The first characters, shown in listings so people can tell tokens apart.
    prefix = models.CharField(max_length=12, editable=False)
    scopes = models.JSONField(default=list)
    created = models.DateTimeField(auto_now_add=True)
    expires = models.DateTimeField(null=True, blank=True)
    revoked = models.DateTimeField(null=True, blank=True)
    last_used = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def issue(cls, *, user, name: str, scopes: list[str] | None = None, expires=None) -> tuple[ApiToken, str]:
        """Create a token and return it with its plain value, which is not stored."""
        plain = new_token("grid")
        token = cls.objects.create(
            user=user,
            name=name,
            token_hash=hash_token(plain),
            prefix=plain[:12],
            scopes=scopes or [s.value for s in cls.Scope],
            expires=expires,
        )
        return token, plain

    def is_active(self) -> bool:
        now = timezone.now()
        return self.revoked is None and (self.expires is None or self.expires > now)
