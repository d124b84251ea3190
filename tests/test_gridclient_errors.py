"""Mapping of gateway error responses to gridclient exceptions."""

import json

import httpx
import pytest

import gridclient as gr

URL = "http://gateway.test"


def client_for(handler, **options) -> gr.GridNetwork:
    return gr.GridNetwork(
        URL,
        token="tok-123",
        transport=httpx.MockTransport(handler),
        sleep=lambda seconds: None,
        **options,
    )


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"code": code, "message": message, "field": field}}
    ).encode()


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, gr.InvalidInput),
        (401, gr.Unauthorized),
        (403, gr.Forbidden),
        (404, gr.NotFound),
        (409, gr.Conflict),
        (413, gr.PayloadTooLarge),
        (415, gr.UnsupportedMediaType),
        (422, gr.ModelError),
        (429, gr.RateLimited),
        (503, gr.Unavailable),
        (504, gr.GatewayTimeout),
    ],
)
def test_status_maps_to_class(status, cls):
    def handler(request):
        return httpx.Response(
            status, content=error_body("some_code", "went wrong", "replicas")
        )

    with client_for(handler, retries=0) as gateway:
        with pytest.raises(cls) as caught:
            gateway.get_model("m1")

    assert caught.value.status == status
    assert caught.value.code == "some_code"
    assert caught.value.message == "went wrong"
    assert caught.value.field == "replicas"
    assert isinstance(caught.value, gr.GridError)


def test_unknown_status_is_grid_error():
    def handler(request):
        return httpx.Response(500, content=error_body("internal", "server error"))

    with client_for(handler) as gateway:
        with pytest.raises(gr.GridError) as caught:
            gateway.available_tags()

    assert type(caught.value) is gr.GridError
    assert caught.value.status == 500
    assert caught.value.code == "internal"


def test_null_field_is_none():
    def handler(request):
        return httpx.Response(404, content=error_body("not_found", "no model m1"))

    with client_for(handler) as gateway:
        with pytest.raises(gr.NotFound) as caught:
            gateway.get_model("m1")

    assert caught.value.field is None
    assert str(caught.value) == "HTTP 404 not_found: no model m1"


def test_html_body_keeps_status_and_excerpt():
    page = b"<html><body>502 Bad Gateway from nginx</body></html>" + b"x" * 1000

    def handler(request):
        return httpx.Response(503, content=page)

    with client_for(handler, retries=0) as gateway:
        with pytest.raises(gr.Unavailable) as caught:
            gateway.connected_nodes()

    assert caught.value.status == 503
    assert caught.value.code == "unexpected_response"
    assert "502 Bad Gateway from nginx" in caught.value.message
    assert len(caught.value.message) < 300


def test_json_without_error_key():
    def handler(request):
        return httpx.Response(400, json={"detail": "bad"})

    with client_for(handler) as gateway:
        with pytest.raises(gr.InvalidInput) as caught:
            gateway.get_model("m1")

    assert caught.value.code == "unexpected_response"
    assert '{"detail":"bad"}' in caught.value.message


def test_empty_error_body():
    def handler(request):
        return httpx.Response(401)

    with client_for(handler) as gateway:
        with pytest.raises(gr.Unauthorized) as caught:
            gateway.get_model("m1")

    assert caught.value.message == "empty body"


def test_unreachable_gateway_names_url():
    def handler(request):
        raise httpx.ConnectError("connection refused", request=request)

    with client_for(handler, retries=2) as gateway:
        with pytest.raises(gr.GridConnectionError) as caught:
            gateway.available_models()

    assert isinstance(caught.value, ConnectionError)
    assert URL in str(caught.value)
    assert caught.value.code == "connection_failed"
    assert caught.value.status is None


def test_read_timeout_is_connection_error():
    def handler(request):
        raise httpx.ReadTimeout("timed out", request=request)

    with client_for(handler, retries=0) as gateway:
        with pytest.raises(gr.GridConnectionError) as caught:
            gateway.get_model("m1")

    assert caught.value.code == "timeout"
    assert URL in str(caught.value)


def test_success_body_not_json():
    def handler(request):
        return httpx.Response(200, content=b"<html>login</html>")

    with client_for(handler) as gateway:
        with pytest.raises(gr.GridError) as caught:
            gateway.available_tags()

    assert caught.value.code == "unexpected_response"
    assert caught.value.status == 200
    assert "<html>login</html>" in caught.value.message


def test_error_repr_has_fields():
    error = gr.Conflict("model m1 exists", status=409, code="exists", field="model_id")

    assert repr(error) == (
        "Conflict(status=409, code='exists', message='model m1 exists', field='model_id')"
    )


def test_verification_mismatch_class():
    def handler(request):
        message = "nodes node-a and node-b returned different outputs"
        return httpx.Response(409, content=error_body("verification_mismatch", message))

    with client_for(handler) as gateway:
        with pytest.raises(gr.VerificationMismatch) as caught:
            gateway.get_model("m1")

    assert isinstance(caught.value, gr.Conflict)
    assert caught.value.status == 409
    assert "node-a and node-b" in caught.value.message


def test_mismatch_code_other_status():
    # The code picks the subclass only with the status it belongs to.
    def handler(request):
        return httpx.Response(400, content=error_body("verification_mismatch", "x"))

    with client_for(handler) as gateway:
        with pytest.raises(gr.InvalidInput) as caught:
            gateway.get_model("m1")

    assert type(caught.value) is gr.InvalidInput
