"""gridclient against a real gateway process: auth, errors, rate limits, updates."""

from __future__ import annotations

import json
import time

import pytest

import gridclient as gr
from tests.gateway_stack import gateway_only

pytestmark = pytest.mark.e2e

# Users, tokens and a model row, made in one `manage.py shell` run.
SETUP = """
import json
from django.contrib.auth import get_user_model
from django.utils import timezone
from apps.accounts.models import ApiToken
from apps.inference.models import Model

alice = get_user_model().objects.create_user("alice")
tokens = {
    "alice": ApiToken.issue(user=alice, name="all")[1],
    "read": ApiToken.issue(user=alice, name="read", scopes=["read"])[1],
    "limited": ApiToken.issue(user=alice, name="limited")[1],
}
revoked, tokens["revoked"] = ApiToken.issue(user=alice, name="revoked")
ApiToken.objects.filter(pk=revoked.pk).update(revoked=timezone.now())
signature = [{"name": "x", "dtype": "float32", "shape": [None, 4]}]
Model.objects.create(model_id="alice-model", owner=alice, sha256="0" * 64, size=1,
                     input_signature=signature)
print(json.dumps(tokens))
"""

LIMIT = 5


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    with gateway_only(tmp, GRID_THROTTLE_RATE=f"{LIMIT}/min") as (stack, staff):
        # The JSON is the last line; Django may print notes before it.
        tokens = json.loads(stack.manage("shell", "-c", SETUP).splitlines()[-1])
        yield stack.url, {**tokens, "staff": staff}


def test_token_read_from_env(gateway, monkeypatch):
    url, tokens = gateway
    monkeypatch.setenv("GRID_TOKEN", tokens["alice"])
    with gr.GridNetwork(url) as network:
        models = network.available_models()
    assert [m.model_id for m in models] == ["alice-model"]


def test_owner_updates_model(gateway):
    url, tokens = gateway
    with gr.GridNetwork(url, token=tokens["alice"]) as network:
        info = network.update_model("alice-model", allow_remote_inference=True)
        again = network.get_model("alice-model")
    assert info.allow_remote_inference is True
    assert again.allow_remote_inference is True
    assert again.allow_download is False


def test_missing_scope_is_forbidden(gateway):
    url, tokens = gateway
    with gr.GridNetwork(url, token=tokens["read"]) as network:
        with pytest.raises(gr.Forbidden) as caught:
            network.update_model("alice-model", allow_download=True)
    assert caught.value.status == 403
    assert caught.value.code == "missing_scope"
    assert "'serve'" in caught.value.message


def test_non_staff_cannot_disconnect(gateway):
    url, tokens = gateway
    with gr.GridNetwork(url, token=tokens["alice"]) as network:
        with pytest.raises(gr.Forbidden) as caught:
            network.disconnect_nodes()
    assert "only staff" in caught.value.message


def test_staff_disconnect_counts_nodes(gateway):
    url, tokens = gateway
    with gr.GridNetwork(url, token=tokens["staff"]) as network:
        count = network.disconnect_nodes()
    assert count == 0


def test_revoked_token_is_unauthorized(gateway):
    url, tokens = gateway
    with gr.GridNetwork(url, token=tokens["revoked"]) as network:
        with pytest.raises(gr.Unauthorized) as caught:
            network.connected_nodes()
    assert caught.value.code == "unauthenticated"
    assert "was revoked" in caught.value.message


def test_unknown_model_is_not_found(gateway):
    url, tokens = gateway
    with gr.GridNetwork(url, token=tokens["alice"]) as network:
        with pytest.raises(gr.NotFound) as caught:
            network.get_model("nope")
    assert "'nope'" in caught.value.message


def test_rate_limit_honours_retry_after(gateway):
    url, tokens = gateway
    # A minute window: start well inside one, so all requests share it.
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    waits: list[float] = []
    with gr.GridNetwork(
        url, token=tokens["limited"], retries=1, sleep=waits.append
    ) as network:
        for _ in range(LIMIT):
            network.available_tags()
        with pytest.raises(gr.RateLimited) as caught:
            network.available_tags()
    assert caught.value.status == 429
    assert caught.value.code == "rate_limited"
    assert len(waits) == 1
    assert 1 <= waits[0] <= 60
