"""ASGI entry point: HTTP through Django, agent websockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gridsite.settings")
django_http = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from apps.registry.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_http,
        # Agents are not browsers: they authenticate with a bearer token and
        # send no Origin header, so no origin check applies here.
        "websocket": URLRouter(websocket_urlpatterns),
    }
)
