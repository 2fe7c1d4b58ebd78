"""Hostile and malformed input on every endpoint: the documented 4xx, never a 500, no harm to other streams."""

import json
import socket
import time
import uuid

import pytest
import requests
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from myapp.brokers import get_broker
from myapp.exceptions import EventTooLarge, InvalidEvent
from myapp.ids import parse
from myapp.publish import send_event
from myapp.tokens import subscription_token
from tests.sse_client import SSEClient, SSEParser


@pytest.fixture
def alice(db):
    user = get_user_model().objects.create_user("alice", password="pw-alice-123")
    client = Client()
    client.force_login(user)
    return client


# -- /events/ in-process ----------------------------------------------------------

EVENTS_CASES = [
    ("CR in channel", "/events/?channel=room%0Da", 400),
    ("LF in channel", "/events/?channel=room%0Aevent:%20x", 400),
    ("NUL in channel", "/events/?channel=room%00a", 400),
    ("invalid UTF-8 in channel", "/events/?channel=%FF%FE", 400),
    ("SQL metacharacters", "/events/?channel=room';DROP%20TABLE%20auth_user;--", 400),
    ("200-byte channel", "/events/?channel=" + "c" * 200, 400),
    ("too many channels", "/events/?" + "&".join(f"channel=room:{n}" for n in range(11)), 400),
    ("empty channel", "/events/?channel=", 400),
    ("unadmitted group", "/events/?channel=team:x", 403),
    ("another user's channel", "/events/?channel=user:999", 403),
    ("garbage token", "/events/?token=%FF%00", 401),
    ("job of nobody", "/events/?channel=job:99999999999999999999999", 403),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("url", "status"), [c[1:] for c in EVENTS_CASES], ids=[c[0] for c in EVENTS_CASES])
def test_events_refuses_bad_requests(memory_broker, alice, url, status):
    """Each bad /events/ request gets its documented 4xx with a JSON reason."""
    response = alice.get(url)
    assert response.status_code == status
    assert json.loads(response.content)["error"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "last_event_id",
    ["x" * (1 << 20), "1-2\r\nevent: evil", "\ud800", "-1--1", "99999999999999999999-0", "0-0"],
    ids=["1 MiB", "CRLF", "lone surrogate", "negative", "overflow", "zero"],
)
def test_hostile_last_event_id_resets_or_resumes_never_fails(memory_broker, alice, last_event_id):
    """Any Last-Event-ID gives 200: a stream.reset when unusable (a 400 would stop the browser for good)."""
    response = alice.get("/events/", HTTP_LAST_EVENT_ID=last_event_id)
    try:
        assert response.status_code == 200
        (first,) = SSEParser().feed(next(response.streaming_content))
        assert first.type in ("stream.open", "stream.reset")
        if last_event_id != "0-0":
            assert first.type == "stream.reset"
    finally:
        response.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("method", ["post", "put", "delete", "patch", "head"])
def test_events_other_methods_are_405(memory_broker, alice, method):
    """Only GET (and OPTIONS preflight) are served."""
    assert getattr(alice, method)("/events/").status_code == 405


@pytest.mark.django_db(transaction=True)
def test_per_user_stream_limit_gives_429_with_retry_after(memory_broker, alice, settings):
    """Over MYAPP_MAX_STREAMS_PER_USER: 429 + Retry-After, and ?check=1 says so too."""
    settings.MYAPP_MAX_STREAMS_PER_USER = 2
    open_ones = [alice.get("/events/") for _ in range(2)]
    try:
        refused = alice.get("/events/")
        assert (refused.status_code, refused["Retry-After"]) == (429, "5")
        assert alice.get("/events/?check=1").status_code == 429
    finally:
        for response in open_ones:
            response.close()
    second_chance = alice.get("/events/")
    assert second_chance.status_code == 200
    second_chance.close()


@pytest.mark.parametrize(
    ("channels", "message"),
    [
        ([""], "channel must not be empty"),
        (["bad name\n"], "channel may only contain"),
        (["c" * 5000], "channel is 5000 characters; the limit is 128"),
        (["!hub:1-0123456789ab"], "channel may only contain"),
        (["room:a", 7], "channel must be a str"),
        ([], "a subscription token must grant at least one channel"),
        ("room:a", "channels must be a list of channel names, not a str"),
    ],
    ids=["empty", "LF", "5000 characters", "hub prefix", "not a str", "no channel", "a str"],
)
def test_subscription_token_refuses_invalid_channels(channels, message):
    """Minting a token for channels no stream could carry raises InvalidEvent naming the rule."""
    with pytest.raises(InvalidEvent, match=message):
        subscription_token(channels)


@pytest.mark.django_db(transaction=True)
def test_token_length_is_bounded_before_checking(memory_broker, settings):
    """Tokens longer than 4096 characters are refused without being verified."""
    good = subscription_token(["room:a"])
    assert Client().get("/events/", {"token": good + "x" * 5000}).status_code == 401


# -- CORS --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_cors_echoes_only_allowed_origins_with_credentials(memory_broker, alice, settings):
    """An allowed Origin is echoed exactly with credentials (never *); others get 403."""
    settings.MYAPP_CORS_ALLOWED_ORIGINS = ["https://app.example.com"]
    allowed = alice.get("/events/", HTTP_ORIGIN="https://app.example.com")
    try:
        assert allowed.status_code == 200
        assert allowed["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert allowed["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in allowed["Vary"]
    finally:
        allowed.close()
    refused = alice.get("/events/", HTTP_ORIGIN="https://evil.example.com")
    assert refused.status_code == 403 and "Access-Control-Allow-Origin" not in refused
    same = alice.get("/events/", HTTP_ORIGIN="http://testserver")
    assert same.status_code == 200 and "Access-Control-Allow-Origin" not in same
    same.close()


@pytest.mark.django_db(transaction=True)
def test_cors_preflight(memory_broker, settings):
    """OPTIONS from an allowed origin answers the preflight; the error responses carry CORS too."""
    settings.MYAPP_CORS_ALLOWED_ORIGINS = ["https://app.example.com"]
    response = Client().options("/events/", HTTP_ORIGIN="https://app.example.com")
    assert response.status_code == 204
    assert response["Access-Control-Allow-Methods"] == "GET"
    assert "Last-Event-ID" in response["Access-Control-Allow-Headers"]
    anonymous = Client().get("/events/", HTTP_ORIGIN="https://app.example.com")
    assert anonymous.status_code == 401 and anonymous["Access-Control-Allow-Origin"] == "https://app.example.com"


# -- send_event and the management command -------------------------------------------

BAD_EVENTS = [
    ({"channel": "room a", "event_type": "t", "data": 1}, InvalidEvent, "channel may only contain"),
    ({"channel": "r" * 129, "event_type": "t", "data": 1}, InvalidEvent, "limit is 128"),
    ({"channel": 7, "event_type": "t", "data": 1}, InvalidEvent, "channel must be a str"),
    ({"channel": "room:a", "event_type": "", "data": 1}, InvalidEvent, "must not be empty"),
    ({"channel": "room:a", "event_type": "a\nb", "data": 1}, InvalidEvent, "CR, LF or NUL"),
    ({"channel": "room:a", "event_type": "t" * 65, "data": 1}, InvalidEvent, "limit is 64"),
    ({"channel": "room:a", "event_type": "stream.open", "data": 1}, InvalidEvent, "reserved"),
    ({"channel": "room:a", "event_type": "t", "data": 1, "id": "a\rb"}, InvalidEvent, "CR, LF or NUL"),
    ({"channel": "room:a", "event_type": "t", "data": object()}, InvalidEvent, "not JSON-serializable"),
    ({"channel": "room:a", "event_type": "t", "data": float("nan")}, InvalidEvent, "not JSON-serializable"),
    ({"channel": "room:a", "event_type": "t", "data": b"bytes", "raw": True}, InvalidEvent, "data must be a str"),
    ({"channel": "room:a", "event_type": "t", "data": "\ud800", "raw": True}, InvalidEvent, "lone surrogate"),
    ({"channel": "room:a", "event_type": "t", "data": "x" * 300000}, EventTooLarge, "MYAPP_MAX_EVENT_BYTES"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_EVENTS, ids=[m for _, _, m in BAD_EVENTS])
def test_send_event_raises_documented_errors(memory_broker, kwargs, error, message):
    """Bad input raises InvalidEvent (or EventTooLarge) naming the rule; nothing is published."""
    kwargs = dict(kwargs)
    args = kwargs.pop("channel"), kwargs.pop("event_type"), kwargs.pop("data")
    with pytest.raises(error, match=message):
        send_event(*args, **kwargs)
    assert get_broker().last_position() == 0


def test_send_event_lone_surrogates_in_json_still_publish(memory_broker):
    """JSON data may carry lone surrogates: they are sent as \\u escapes, which JSON.parse restores."""
    send_event("room:a", "t", {"text": "\ud800"})
    assert get_broker().history(["room:a"], 0).events[0].data == '{"text":"\\ud800"}'


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    channel=st.text(max_size=140),
    event_type=st.text(max_size=70),
    key=st.none() | st.text(max_size=20),
    data=st.text(max_size=50),
    raw=st.booleans(),
)
def test_fuzzed_send_event_publishes_intact_or_raises_invalid_event(memory_broker, channel, event_type, key, data, raw):
    """send_event either raises InvalidEvent or publishes exactly what was given."""
    before = get_broker().last_position()
    try:
        event_id = send_event(channel, event_type, data, id=key, raw=raw)
    except InvalidEvent:
        assert get_broker().last_position() == before
        return
    if parse(event_id) > before:
        (event,) = get_broker().history([channel], before).events
        expected = data if raw else json.dumps(data, ensure_ascii=False)
        assert (event.event_type, event.data) == (event_type, expected)


def test_management_command_publishes_and_prints_the_id(memory_broker, capsys):
    """manage.py send_event CHANNEL EVENT_TYPE DATA_JSON prints the event id."""
    call_command("send_event", "room:ops", "maintenance", '{"at": "22:00"}')
    event = get_broker().history(["room:ops"], 0).events[0]
    assert capsys.readouterr().out.strip() == event.id
    assert (event.event_type, event.data) == ("maintenance", '{"at":"22:00"}')


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["room:ops", "t", "{not json"], "DATA_JSON is not valid JSON"),
        (["bad channel", "t", "1"], "channel may only contain"),
        (["room:ops", "a\nb", "1"], "CR, LF or NUL"),
    ],
)
def test_management_command_errors_are_clear(memory_broker, args, message):
    """Bad arguments raise CommandError with the reason (exit status 1, no traceback)."""
    with pytest.raises(CommandError, match=message):
        call_command("send_event", *args)


def test_management_command_reports_an_unreachable_broker(settings):
    settings.MYAPP_BROKER = {"BACKEND": "myapp.brokers.redis.RedisBroker", "OPTIONS": {"url": "unix:///nonexistent"}}
    with pytest.raises(CommandError, match="the broker is unavailable"):
        call_command("send_event", "room:ops", "t", "1")


# -- the real stack -----------------------------------------------------------------


def raw_request(stack, request_bytes):
    """Send raw bytes to the server; return the status line's code (int) or None if it closed."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        reply = sock.recv(4096)
    return int(reply.split()[1]) if reply.startswith(b"HTTP/1.") else None


@pytest.mark.e2e
def test_barrage_of_hostile_requests_leaves_other_streams_intact(stack):
    """Hostile requests on every endpoint get 4xx (never 500) while a bystander's stream stays well-formed."""
    session = stack.login("alice")
    channel = f"room:bystander-{uuid.uuid4().hex[:6]}"
    bystander = SSEClient(session, f"{stack.url}/events/?channel={channel}")
    bystander.wait_count("stream.open", 1)
    statuses = []
    cookie = "; ".join(f"{k}={v}" for k, v in session.cookies.items())
    for path in [
        "/events/?channel=room%0D%0Aevent:%20evil",
        "/events/?channel=%FF%FE%00",
        "/events/?channel=room';DROP%20TABLE%20myapp_postgres_event;--",
        "/events/?channel=" + "x" * 200,
        "/events/?channel=job:-1",
        "/jobs/99999999999999999999999999/",
        "/jobs/0/watch/",
        "/events/?channel=" + "%FF" * 1300,
    ]:
        with session.get(stack.url + path, timeout=10, stream=True) as response:
            statuses.append(response.status_code)
    statuses.append(
        session.get(stack.url + "/events/", headers={"Last-Event-ID": "x" * (1 << 20)}, timeout=10).status_code
    )
    statuses.append(raw_request(stack, b"GET /events/?" + b"q" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
    statuses.append(
        raw_request(
            stack,
            b"GET /events/ HTTP/1.1\r\nHost: x\r\nCookie: " + cookie.encode() + b"\r\nLast-Event-ID: \xff\xfe\r\n\r\n",
        )
    )
    for body, content_type in [
        (b"\xff\xfe", "application/json"),
        (b"", "application/json"),
        (b'{"channel": "a\\u0000b", "event_type": "t", "data": 1}', "application/json"),
        (json.dumps({"channel": channel, "event_type": "x\ndata: injected", "data": 1}).encode(), "application/json"),
        (
            json.dumps({"channel": channel, "event_type": "t", "data": 1, "id": "1\r\n\r\ndata: injected"}).encode(),
            "application/json",
        ),
        (json.dumps({"channel": "c" * 200, "event_type": "t", "data": 1}).encode(), "application/json"),
        (b"channel=x", "text/plain"),
        (b"x" * 2_000_000, "application/json"),
    ]:
        from tests.stack import PUBLISH_TOKEN

        response = session.post(
            stack.url + "/api/events/",
            data=body,
            headers={"Content-Type": content_type, "Authorization": f"Bearer {PUBLISH_TOKEN}"},
            timeout=10,
        )
        statuses.append(response.status_code)
    # gunicorn itself refuses the 1 MiB header (431), the 10 kB request line (414) and the
    # non-ASCII header bytes (400) before Django runs.
    assert all(status is not None and 400 <= status < 500 for status in statuses), statuses
    assert 431 in statuses and 414 in statuses
    stack.publish(channel, "still fine")
    bystander.wait_count("note", 1)
    assert [(m.type, m.data) for m in bystander.messages] == [
        ("stream.open", bystander.messages[0].data),
        ("note", '"still fine"'),
    ]
    bystander.close()


def publish_head(stack, *headers):
    """The request line and headers of an authenticated JSON POST /api/events/ (bytes), without a body."""
    from tests.stack import PUBLISH_TOKEN

    lines = [
        "POST /api/events/ HTTP/1.1",
        f"Host: 127.0.0.1:{stack.port}",
        f"Authorization: Bearer {PUBLISH_TOKEN}",
        "Content-Type: application/json",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_reply(sock, timeout):
    """Read one HTTP response with a Content-Length from ``sock``; return (status, JSON body)."""
    sock.settimeout(timeout)
    reply = b""
    while b"\r\n\r\n" not in reply:
        data = sock.recv(65536)
        assert data, f"the server closed the connection after {reply!r}"
        reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = int({name.lower(): value for name, value in fields.items()}[b"content-length"])
    while len(body) < length:
        data = sock.recv(65536)
        assert data, "the server closed the connection mid-body"
        body += data
    return int(head.split()[1]), json.loads(body[:length])


@pytest.mark.e2e
def test_chunked_publish_body_is_read_and_delivered(redis_stack):
    """A chunked publish body (no Content-Length) is read whole, published, and reaches a stream."""
    from tests.stack import PUBLISH_TOKEN

    session = redis_stack.login("alice")
    channel = f"room:chunked-{uuid.uuid4().hex[:6]}"
    client = SSEClient(session, f"{redis_stack.url}/events/?channel={channel}")
    try:
        client.wait_count("stream.open", 1)
        body = json.dumps({"channel": channel, "event_type": "note", "data": {"text": "in pieces"}}).encode()
        pieces = (body[start : start + 7] for start in range(0, len(body), 7))  # a generator: sent chunked
        response = requests.post(
            redis_stack.url + "/api/events/",
            data=pieces,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {PUBLISH_TOKEN}"},
            timeout=10,
        )
        assert response.request.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in response.request.headers
        assert response.status_code == 200, response.text
        (note,) = client.wait_count("note", 1)
        assert (note.data, note.last_event_id) == ('{"text":"in pieces"}', response.json()["id"])
    finally:
        client.close()


@pytest.mark.e2e
def test_chunked_publish_body_over_the_limit_is_413_before_it_ends(redis_stack):
    """A chunked 10 MB body gets 413 once past MYAPP_PUBLISH_MAX_BODY_BYTES, while the client has not sent the rest."""
    limit = int(redis_stack.env["MYAPP_PUBLISH_MAX_BODY_BYTES"])
    total, piece = 10 * 1024 * 1024, b"x" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", redis_stack.port), timeout=10) as sock:
        sock.sendall(publish_head(redis_stack, "Transfer-Encoding: chunked"))
        # Send just past the limit, then stop: no further chunk and no last chunk. A server that
        # waited for the whole body would never answer.
        while sent <= limit + len(piece):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        status, body = read_reply(sock, timeout=10)
    assert (status, body) == (413, {"error": f"the body is larger than {limit} bytes (MYAPP_PUBLISH_MAX_BODY_BYTES)"})
    assert sent < total / 8, "answered with most of the 10 MB never sent"
    assert redis_stack.publish("room:after-413", 1).status_code == 200, "the server goes on"


@pytest.mark.e2e
@pytest.mark.parametrize(
    "chunks",
    [b"zz\r\n{}\r\n0\r\n\r\n", b"5\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n"],
    ids=["bad size", "short chunk", "no CRLF after the data"],
)
def test_malformed_chunked_publish_body_is_400(redis_stack, chunks):
    """Broken chunked framing gets 400 "could not be read": the server's parse error does not become a 500."""
    with socket.create_connection(("127.0.0.1", redis_stack.port), timeout=10) as sock:
        sock.sendall(publish_head(redis_stack, "Transfer-Encoding: chunked") + chunks)
        if chunks.startswith(b"5"):
            sock.shutdown(socket.SHUT_WR)  # the chunk promised 5 bytes; the body ends after 2
        status, body = read_reply(sock, timeout=10)
    assert (status, body) == (400, {"error": "the body could not be read (malformed chunked encoding or an early end)"})
    assert redis_stack.publish("room:after-broken-chunks", 1).status_code == 200, "the server goes on"


@pytest.mark.e2e
def test_publish_without_length_or_chunks_is_an_empty_body(redis_stack):
    """No Content-Length and no Transfer-Encoding: the body is empty (RFC 9112 6.3), a 400 that says how to send one."""
    with socket.create_connection(("127.0.0.1", redis_stack.port), timeout=10) as sock:
        sock.sendall(publish_head(redis_stack))
        status, body = read_reply(sock, timeout=10)
    assert status == 400
    assert body["error"] == "the body is empty: send a JSON object with Content-Length or Transfer-Encoding: chunked"


def signed_token(stack, payload):
    """Sign a token payload as the stack would (its SECRET_KEY, the tokens' salt), unvalidated."""
    from django.core import signing

    return signing.dumps(payload, key=stack.env["DJANGO_SECRET_KEY"], salt="myapp.subscription-token", compress=True)


SIGNED_TOKEN_CASES = [
    ("empty name", [""], 400, "the subscription token cannot open a stream: channel must not be empty"),
    ("LF in name", ["bad name\n"], 400, "channel may only contain"),
    ("5000-character name", ["c" * 5000], 400, "channel is 5000 characters; the limit is 128"),
    ("hub's reserved prefix", ["!hub:1-0123456789ab"], 400, "channel may only contain"),
    ("one bad name among good", ["room:a", "bad name"], 400, "channel may only contain"),
    (
        "no channel",
        [],
        400,
        "the subscription token cannot open a stream: a subscription token must grant at least one",
    ),
    ("a string, not a list", "room:a", 401, "invalid subscription token: malformed token"),
    ("not a list of strings", [["room:a"]], 401, "invalid subscription token: malformed token"),
]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("channels", "status", "reason"),
    [case[1:] for case in SIGNED_TOKEN_CASES],
    ids=[case[0] for case in SIGNED_TOKEN_CASES],
)
def test_signed_token_with_invalid_channels_is_refused(redis_stack, channels, status, reason):
    """A correctly signed token (older or forged) whose channels cannot be streamed is refused with its reason."""
    token = signed_token(redis_stack, {"c": channels, "e": int(time.time()) + 600})
    for query in ("", "&check=1"):
        with requests.get(f"{redis_stack.url}/events/?token={token}{query}", stream=True, timeout=5) as response:
            assert response.status_code == status, response.headers
            assert reason in response.json()["error"]


@pytest.mark.e2e
def test_repeated_channel_counts_once(redis_stack):
    """The same channel 11 times opens a stream carrying it once; 11 distinct channels are still refused."""
    session = redis_stack.login("alice")
    client = SSEClient(session, f"{redis_stack.url}/events/?" + "&".join(["channel=room:a"] * 11))
    try:
        assert client.status == 200, client.response.text[:200]
        (opened,) = client.wait_count("stream.open", 1)
        assert json.loads(opened.data)["channels"] == ["room:a"]
    finally:
        client.close()
    distinct = session.get(f"{redis_stack.url}/events/?" + "&".join(f"channel=room:{n}" for n in range(11)), timeout=5)
    assert distinct.status_code == 400
    assert "at most 10 channels" in distinct.json()["error"]


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["query", "header"])
def test_empty_last_event_id_opens_a_fresh_stream(redis_stack, where):
    """An empty ?lastEventId= or Last-Event-ID header is absent: stream.open, resumed false, no stream.reset."""
    session = redis_stack.login("alice")
    if where == "query":
        client = SSEClient(session, f"{redis_stack.url}/events/?lastEventId=")
    else:
        client = SSEClient(session, f"{redis_stack.url}/events/", headers={"Last-Event-ID": ""})
        assert client.response.request.headers["Last-Event-ID"] == ""
    try:
        assert client.status == 200
        client.wait_count("stream.open", 1)
        first = client.messages[0]
        assert (first.type, json.loads(first.data)["resumed"]) == ("stream.open", False)
        assert client.of_type("stream.reset") == []
    finally:
        client.close()


@pytest.mark.e2e
def test_data_a_database_cannot_store_is_delivered_on_every_stack(stack):
    """Raw data with NUL (and its neighbours) is published (200, never 503) and reaches the stream byte-exact."""
    session = stack.login("alice")
    channel = f"room:nul-{uuid.uuid4().hex[:6]}"
    client = SSEClient(session, f"{stack.url}/events/?channel={channel}")
    try:
        client.wait_count("stream.open", 1)
        values = ["a\x00b", "\x00", "\ufeffbom \uffff \U0010ffff", "n\x00" * 40000]
        for value in values:
            response = stack.publish(channel, value, event_type="t", raw=True)
            assert response.status_code == 200, (response.status_code, response.text[:200])
        client.wait_count("t", len(values), timeout=20)
        assert [m.data for m in client.messages if m.type == "t"] == values
    finally:
        client.close()
