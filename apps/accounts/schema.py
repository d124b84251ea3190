"""Describes the API token authentication in the OpenAPI schema."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "apps.accounts.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": (
                "An API token, sent as 'Authorization: Bearer grid_...'. Operators create tokens with "
                "`manage.py createtoken USER --scopes read,infer,serve,admin`."
            ),
        }
