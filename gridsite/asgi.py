"""ASGI entry point: HTTP through Django, agent websockets through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gridsite.settings")
django_http = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from apps.dashboard.consumers import DashboardConsumer  # noqa: E402
from apps.registry.routing import websocket_urlpatterns  # noqa: E402
from gridsite.lifespan import GracefulShutdown  # noqa: E402

# Browsers send their cookies with a websocket handshake from any site, so the
# dashboard's socket checks the Origin header against ALLOWED_HOSTS.
dashboard_socket = AllowedHostsOriginValidator(AuthMiddlewareStack(DashboardConsumer.as_asgi()))

application = ProtocolTypeRouter(
    {
        "http": django_http,
        # Agents are not browsers: they authenticate with a bearer token and
        # send no Origin header, so no origin check applies here.
        "websocket": URLRouter([*websocket_urlpatterns, path("ws/dashboard/", dashboard_socket)]),
    }
)

# Run uvicorn with --lifespan on: SIGTERM then hands agents to other gateway
# processes before this one exits (gridsite.lifespan).
application = GracefulShutdown(application)
