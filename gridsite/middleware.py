"""Request checks that run before any view.

``RejectNulCharacters`` rejects a URL with a NUL character with 400. PostgreSQL
text cannot hold one, so such a value would fail in the database and surface
as a 500 from whichever view passed it to a query.
"""

from __future__ import annotations

from urllib.parse import unquote

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

from gridsite.errors import ApiError, is_api


def _reject(request: HttpRequest) -> HttpResponse | None:
    query = request.META.get("QUERY_STRING", "")
    if "\x00" not in request.path and "\x00" not in unquote(query):
        return None
    message = "the URL contains a NUL character (%00), which no path or parameter accepts; remove it"
    if is_api(request):
        return ApiError(400, "invalid_input", message).response()
    return HttpResponseBadRequest(message, content_type="text/plain")


class RejectNulCharacters:
    # Both modes, so the async inference view gets no thread hop from this.
    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):
        if self.is_async:
            return self._acall(request)
        rejected = _reject(request)
        return rejected if rejected is not None else self.get_response(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        rejected = _reject(request)
        return rejected if rejected is not None else await self.get_response(request)
