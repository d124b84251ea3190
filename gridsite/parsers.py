"""DRF parsers that keep to DATA_UPLOAD_MAX_MEMORY_SIZE.

DRF's JSON and form parsers read the whole body into memory without the check
that Django applies to ``request.body`` and ``request.POST``, so these apply it
themselves and reject a larger body with 413. Multipart uploads are left to
Django's parser, which streams files to disk and checks the other fields.
"""

from __future__ import annotations

import io
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import FormParser, JSONParser

from gridsite.errors import ApiError


def _too_large(size: str) -> ApiError:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return ApiError(
        413,
        "payload_too_large",
        f"the request body is {size} bytes; the limit is {limit} (DATA_UPLOAD_MAX_MEMORY_SIZE): send a smaller body",
        "body",
    )


class _BoundedBody:
    """Read at most DATA_UPLOAD_MAX_MEMORY_SIZE bytes before parsing."""

    def parse(self, stream, media_type=None, parser_context=None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        request = (parser_context or {}).get("request")
        length = request.META.get("CONTENT_LENGTH") if request is not None else None
        if limit is not None and length and length.isdigit() and int(length) > limit:
            raise _too_large(length)
        if limit is not None and stream is not None:
            # The length header may be missing, or wrong; count the bytes too.
            body = stream.read(limit + 1)
            if len(body) > limit:
                raise _too_large(f"over {limit}")
            stream = io.BytesIO(body)
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            # DRF turns only ValueError into a 400; deep nesting would be a 500.
            raise ParseError("the JSON is nested too deeply") from None


class BoundedJSONParser(_BoundedBody, JSONParser):
    pass


class BoundedFormParser(_BoundedBody, FormParser):
    pass
