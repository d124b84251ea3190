"""Rate limits per API token, counted in the real Redis, for REST and for inference."""

from __future__ import annotations

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.test import AsyncClient, Client
from safetensors.numpy import save

from apps.accounts.models import ApiToken
from apps.inference.models import Model
from gridsite import redis as grid_redis
from gridsite.env import ImproperlyConfiguredEnv, env_rate

# A window of a day, so no test run straddles two windows.
DAY = 86400


def token(name: str) -> str:
    user = get_user_model().objects.create_user(name)
    return ApiToken.issue(user=user, name="test")[1]


@pytest.fixture
def limits(settings):
    def apply(
        api: tuple[int, int] | None, infer: tuple[int, int] | None = None
    ) -> None:
        settings.GRID = {
            **settings.GRID,
            "THROTTLE_RATE": api,
            "INFER_THROTTLE_RATE": infer,
        }

    yield apply
    # The counters would outlive the test by a day.
    client = grid_redis.sync_client()
    for name in client.scan_iter(match=grid_redis.key("rate", "*")):
        client.delete(name)


def get(plain: str):
    return Client().get("/api/tags/", HTTP_AUTHORIZATION=f"Bearer {plain}")


@pytest.mark.django_db
def test_fourth_request_is_429(limits):
    limits((3, DAY))
    plain = token("alice")
    statuses = [get(plain).status_code for _ in range(4)]
    response = get(plain)
    error = response.json()["error"]
    assert statuses == [200, 200, 200, 429]
    assert response.status_code == 429
    assert error["code"] == "rate_limited"
    assert "more than 3 requests per 86400 s" in error["message"]
    assert 1 <= int(response["Retry-After"]) <= DAY


@pytest.mark.django_db
def test_limit_is_per_token(limits):
    limits((2, DAY))
    first, second = token("alice"), token("bob")
    for _ in range(3):
        get(first)
    response = get(second)
    assert response.status_code == 200


@pytest.mark.django_db
def test_no_limit_when_off(limits):
    limits(None)
    plain = token("alice")
    statuses = {get(plain).status_code for _ in range(20)}
    assert statuses == {200}


# The async view reads the rows from another thread, so they must be committed.
@pytest.mark.django_db(transaction=True)
async def test_infer_has_own_limit(limits):
    from asgiref.sync import sync_to_async

    limits((1000, DAY), (2, DAY))
    plain = await sync_to_async(token)("alice")
    owner = await get_user_model().objects.aget(username="alice")
    signature = [{"name": "input", "dtype": "float32", "shape": [None, 4]}]
    await Model.objects.acreate(
        model_id="linear",
        owner=owner,
        sha256="0" * 64,
        size=1,
        input_signature=signature,
    )
    body = save({"input": np.zeros((2, 4), np.float32)})
    headers = {"Authorization": f"Bearer {plain}"}
    responses = [
        await AsyncClient().post(
            "/api/models/linear/infer/",
            body,
            content_type="application/vnd.safetensors",
            headers=headers,
        )
        for _ in range(3)
    ]
    statuses = [r.status_code for r in responses]
    # No node is online: the first two pass the limit and find no replica.
    assert statuses == [503, 503, 429]
    assert responses[2].json()["error"]["code"] == "rate_limited"
    assert "GRID_INFER_THROTTLE_RATE" in responses[2].json()["error"]["message"]
    assert int(responses[2]["Retry-After"]) >= 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("600/min", (600, 60)),
        ("20/s", (20, 1)),
        ("10000/hour", (10000, 3600)),
        ("5/d", (5, 86400)),
        ("0", None),
        ("off", None),
    ],
)
def test_env_rate_parses(monkeypatch, raw, expected):
    monkeypatch.setenv("GRID_TEST_RATE", raw)
    assert env_rate("GRID_TEST_RATE", "1/s") == expected


@pytest.mark.parametrize("raw", ["600", "600/fortnight", "-1/min", "many/min"])
def test_env_rate_rejects(monkeypatch, raw):
    monkeypatch.setenv("GRID_TEST_RATE", raw)
    with pytest.raises(ImproperlyConfiguredEnv, match="GRID_TEST_RATE"):
        env_rate("GRID_TEST_RATE", "1/s")
