"""POST /api/control/: disconnect and unsubscribe over HTTP, its authentication and its 4xx (in-process)."""

import json

import pytest
from django.test import Client

from myapp.brokers import get_broker
from myapp.brokers.base import CONTROL_CHANNEL
from myapp.exceptions import BrokerUnavailable
from tests.conftest import wait_until

TOKEN = "control-token-for-tests-0123456789"
URL = "/api/control/"


@pytest.fixture(autouse=True)
def api_settings(settings, request):
    settings.MYAPP_PUBLISH_TOKENS = [TOKEN]  # first: a changed MYAPP_ setting makes a new broker
    request.getfixturevalue("memory_broker")


def post(body, token=TOKEN, content_type="application/json"):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token is not None else {}
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    return Client().post(URL, data=body, content_type=content_type, CONTENT_TYPE=content_type, **headers)


def control_messages():
    return [json.loads(e.data) for e in get_broker().history([CONTROL_CHANNEL], 0).events]


def test_disconnect_ends_the_users_streams(memory_broker, hub_factory):
    """{"action": "disconnect", "user": 5} ends user 5's streams on every hub, not user 6's."""
    first, second = hub_factory(memory_broker), hub_factory(memory_broker)
    mine = [first.subscribe(["room:a"], owner=5), second.subscribe(["user:5"], owner="5")]
    other = first.subscribe(["room:a"], owner=6)
    response = post({"action": "disconnect", "user": 5})
    assert response.status_code == 200, response.content
    assert response.json()["id"]
    wait_until(lambda: all(sub.closed == "disconnect" for sub in mine), what="both streams to end")
    assert other.closed is None


def test_unsubscribe_ends_only_the_channel(memory_broker, hub_factory):
    """unsubscribe reaches the user's streams carrying the channel only."""
    hub = hub_factory(memory_broker)
    on_channel = hub.subscribe(["room:x", "room:y"], owner="9")
    elsewhere = hub.subscribe(["room:y"], owner="9")
    response = post({"action": "unsubscribe", "user": "9", "channel": "room:x"})
    assert response.status_code == 200, response.content
    wait_until(lambda: on_channel.closed == "unsubscribe", what="the stream on room:x to end")
    assert elsewhere.closed is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "must be a JSON object"),
        ({"user": 1}, "field action must be"),
        ({"action": "kick", "user": 1}, "field action must be"),
        ({"action": "disconnect"}, "missing field: user"),
        ({"action": "disconnect", "user": 1, "channel": "room:a"}, "unknown fields for disconnect: channel"),
        ({"action": "unsubscribe", "user": 1}, "missing field: channel"),
        ({"action": "disconnect", "user": ""}, "field user must be"),
        ({"action": "disconnect", "user": True}, "field user must be"),
        ({"action": "disconnect", "user": None}, "field user must be"),
        ({"action": "disconnect", "user": [1]}, "field user must be"),
        ({"action": "unsubscribe", "user": 1, "channel": 3}, "field channel has the wrong type"),
        ({"action": "unsubscribe", "user": 1, "channel": "bad name"}, "channel"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_requests_are_400_and_send_nothing(body, reason):
    response = post(body)
    assert response.status_code == 400
    assert reason in response.json()["error"]
    assert control_messages() == []


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("wrong-token-0123456789abcdef", 403)])
def test_needs_a_publish_token(token, status):
    response = post({"action": "disconnect", "user": 1}, token=token)
    assert response.status_code == status
    assert control_messages() == []


def test_other_methods_and_content_types():
    assert Client().get(URL, HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405
    assert post("action=disconnect", content_type="application/x-www-form-urlencoded").status_code == 415


def test_broker_down_is_503_with_retry_after(monkeypatch):
    def down(*args, **kwargs):
        raise BrokerUnavailable("connection refused")

    monkeypatch.setattr(get_broker(), "publish", down)
    response = post({"action": "disconnect", "user": 1})
    assert response.status_code == 503
    assert response["Retry-After"]
    assert "no stream was ended" in response.json()["error"]
