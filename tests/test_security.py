"""Who may listen, over the real stack: private channels, group channels, tokens, revocation."""

import json
import uuid

import pytest
import requests
from django.core import signing

from tests.sse_client import SSEClient

pytestmark = pytest.mark.e2e


@pytest.fixture
def mint(settings, redis_stack):
    """Sign subscription tokens with the stack's SECRET_KEY."""
    from myapp.tokens import subscription_token

    settings.SECRET_KEY = redis_stack.env["DJANGO_SECRET_KEY"]
    return subscription_token


def user_channel_of(session, stack):
    client = SSEClient(session, stack.url + "/events/")
    (opened,) = client.wait_count("stream.open", 1)
    client.close()
    return json.loads(opened.data)["channels"][0]


def test_another_users_private_channel_is_refused(redis_stack):
    """Asking for another user's user:<pk> channel is 403, and a stream never carries it."""
    alice, bob = redis_stack.login("alice"), redis_stack.login("bob")
    bobs = user_channel_of(bob, redis_stack)
    response = alice.get(f"{redis_stack.url}/events/?channel={bobs}", timeout=5)
    assert response.status_code == 403
    assert "another user's private channel" in response.json()["error"]


def test_group_channel_needs_the_authorizer(redis_stack):
    """A group channel the authorizer does not admit is 403; one it admits streams."""
    alice = redis_stack.login("alice")
    assert alice.get(f"{redis_stack.url}/events/?channel=team:secret", timeout=5).status_code == 403
    mixed = alice.get(f"{redis_stack.url}/events/?channel=room:ok&channel=team:secret", timeout=5)
    assert mixed.status_code == 403, "one refused channel refuses the whole stream"
    client = SSEClient(alice, f"{redis_stack.url}/events/?channel=room:ok")
    assert client.status == 200
    client.close()


def test_tokens_admit_exactly_their_channels(redis_stack, mint):
    """A valid token streams its channels to an anonymous page; nothing else."""
    channel = f"room:board-{uuid.uuid4().hex[:6]}"
    token = mint([channel])
    anonymous = requests.Session()
    client = SSEClient(anonymous, f"{redis_stack.url}/events/?token={token}")
    try:
        client.wait_count("stream.open", 1)
        redis_stack.publish(channel, "public news")
        redis_stack.publish("room:other", "not granted")
        client.wait_count("note", 1)
        assert [m.data for m in client.of_type("note")] == ['"public news"']
    finally:
        client.close()
    other = anonymous.get(f"{redis_stack.url}/events/?token={token}&channel=room:other", timeout=5)
    assert other.status_code == 403 and "does not grant" in other.json()["error"]


@pytest.mark.parametrize(("kind", "status"), [("forged", 401), ("expired", 401), ("garbage", 401), ("too long", 414)])
def test_bad_tokens_are_refused(redis_stack, mint, kind, status):
    """Forged, expired or malformed tokens get 401; a URL over gunicorn's 4094-byte request line gets 414."""
    token = {
        "forged": signing.dumps(
            {"c": ["room:x"], "e": 9999999999}, key="not-the-secret", salt="myapp.subscription-token"
        ),
        "expired": mint(["room:x"], max_age=-1),
        "garbage": "abc",
        "too long": "a" * 5000,
    }[kind]
    response = requests.get(f"{redis_stack.url}/events/", params={"token": token}, timeout=5)
    assert response.status_code == status


def test_revoked_user_is_refused_on_reconnect(redis_stack):
    """A deactivated user keeps nothing: the next connection is 401."""
    name = f"temp{uuid.uuid4().hex[:6]}"
    from tests.stack import PASSWORD

    redis_stack.manage("demo_user", "--username", name, "--password", PASSWORD)
    session = redis_stack.login(name)
    client = SSEClient(session, redis_stack.url + "/events/")
    assert client.status == 200
    client.close()
    redis_stack.manage(
        "shell",
        "--no-imports",
        "-c",
        f"from django.contrib.auth.models import User; User.objects.filter(username={name!r}).update(is_active=False)",
    )
    assert session.get(redis_stack.url + "/events/", timeout=5).status_code == 401
