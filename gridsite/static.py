"""Static files (the admin's CSS and scripts) served by WhiteNoise, asynchronously.

WhiteNoise 6's middleware is synchronous. One synchronous middleware makes
Django run every request, inference included, through a thread hop and back,
so this subclass keeps WhiteNoise's file table and response building and only
makes the call asynchronous. Requests outside STATIC_URL go straight on.
"""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse
from whitenoise.middleware import WhiteNoiseMiddleware


class AsyncWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    sync_capable = False
    async_capable = True

    def __init__(self, get_response=None, **kwargs) -> None:
        super().__init__(get_response, **kwargs)
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        path = request.path_info
        if not path.startswith(self.static_prefix):
            return await self.get_response(request)
        if self.autorefresh:
            # Looks on disk each time (DEBUG), so keep it off the event loop.
            static_file = await sync_to_async(self.find_file, thread_sensitive=False)(path)
        else:
            static_file = self.files.get(path)
        if static_file is None:
            return await self.get_response(request)
        return await sync_to_async(self.serve, thread_sensitive=False)(static_file, request)

