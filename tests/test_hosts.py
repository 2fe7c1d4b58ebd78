"""Several hosts on one Redis behind a real load balancer, as docs/deployment.md ("Several hosts") describes.

Two independent gunicorn masters (each its own port and var directory, one
gevent worker each) share one Valkey server (the broker) and one PostgreSQL
database (users, sessions), with one DJANGO_SECRET_KEY, behind nginx
(scripts/servers/nginx.py: round-robin, default buffering, which the stream view's
``X-Accel-Buffering: no`` turns off for streams). Clients talk to nginx only;
it names the host that answered each request in ``X-Upstream``. The hosts
then fail: killed (SIGKILL) or frozen (SIGSTOP), while clients stream and
events are published.
"""

import json
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import pytest
import requests

from myapp.brokers.redis import RedisBroker
from myapp.ids import format_id
from scripts.servers import Nginx
from tests.conftest import wait_until
from tests.sse_client import ChunkedDecoder, SSEClient, SSEParser, login
from tests.stack import PASSWORD, PUBLISH_TOKEN, USERS, LiveStack, create_database

pytestmark = pytest.mark.e2e

#: Seconds between heartbeats on the hosts (LiveStack's default).
HEARTBEAT = 1.0
#: nginx's proxy_read_timeout (seconds): several heartbeats, so a quiet stream is
#: never cut, and short, so a frozen host's clients move on quickly.
READ_TIMEOUT = 4


class Site:
    """Two hosts of one site behind nginx; ``url`` is nginx's."""

    def __init__(self, balancer, hosts):
        self.balancer = balancer
        self.hosts = hosts
        self.url = balancer.url

    def host_of(self, response_or_client):
        """The LiveStack that served a response (or an SSEClient's stream), from nginx's X-Upstream header.

        When nginx tried several hosts the header lists them all; the last one answered.
        """
        tried = [address.strip() for address in response_or_client.headers["X-Upstream"].split(",")]
        (host,) = [host for host in self.hosts if host.address == tried[-1]]
        return host

    def login(self, user):
        """A requests.Session logged in as ``user`` through nginx."""
        return login(self.url, user, PASSWORD)

    def publish(self, channel, data, **fields):
        """Publish through nginx's publish API; return the response."""
        return requests.post(
            self.url + "/api/events/",
            json={"channel": channel, "event_type": "note", "data": data, **fields},
            headers={"Authorization": f"Bearer {PUBLISH_TOKEN}"},
            timeout=10,
        )

    def stream(self, session, channel, last_event_id=None):
        """An SSEClient on ``channel`` through nginx, answered 200."""
        client = SSEClient(session, f"{self.url}/events/?channel={channel}", last_event_id=last_event_id)
        assert client.status == 200, client.response.text
        return client

    def streams_on(self, host):
        """Open streams on ``host`` by its own count (GET /healthz on its port; one worker per host)."""
        return requests.get(host.url + "/healthz", timeout=5).json()["streams"]

    def answers(self, host):
        """True if ``host`` answers /healthz on its own port."""
        try:
            return requests.get(host.url + "/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False


@pytest.fixture(scope="module")
def shared(tmp_path_factory, valkey_server, postgres_server):
    """What every host of the site shares: the broker, one migrated database with the test users, the secret key.

    Sessions live in the database and their auth hash is signed with the
    SECRET_KEY, so a login made by one host is valid on every host only if
    they share both.
    """
    settings = {
        "mode": "redis",
        "redis_url": valkey_server.url,
        "database_url": create_database(postgres_server),
        "secret_key": "hosts-" + uuid.uuid4().hex,
    }
    LiveStack(tmp_path_factory.mktemp("site-setup"), **settings).prepare_database()
    return settings


@contextmanager
def _site(directory, shared):
    """Start two hosts on ``shared`` (at once) and nginx in front of them; give the Site, stop them all at the end."""
    common = {
        **shared,
        "workers": 1,
        "heartbeat": HEARTBEAT,
        "prepare": False,
        "task_worker": False,  # no test here runs a job
    }
    hosts = [LiveStack(directory / "host-a", **common), LiveStack(directory / "host-b", **common)]
    with ExitStack() as running:
        with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
            starting = [pool.submit(host.__enter__) for host in hosts]
        for host, started in zip(hosts, starting, strict=True):
            if started.exception() is None:
                running.push(host.__exit__)
        for started in starting:
            started.result()
        balancer = running.enter_context(
            Nginx(directory / "nginx", [host.address for host in hosts], read_timeout=READ_TIMEOUT)
        )
        yield Site(balancer, hosts)


@pytest.fixture(scope="module")
def site(tmp_path_factory, shared):
    """Two hosts behind nginx for the module."""
    with _site(tmp_path_factory.mktemp("site"), shared) as site:
        yield site


@pytest.fixture(scope="module")
def logins(site):
    """The session cookies of each test user, logged in once through nginx: valid on every host of the site."""
    return {user: site.login(user).cookies for user in USERS}


def sessions_of(logins):
    """A fresh requests.Session per test user, with the cookies of its login."""
    sessions = []
    for cookies in logins.values():
        session = requests.Session()
        session.cookies.update(cookies)
        sessions.append(session)
    return sessions


def room():
    return f"room:hosts-{uuid.uuid4().hex[:10]}"


def notes(messages):
    return [json.loads(m.data) for m in messages if m.type == "note"]


def test_a_login_on_one_host_is_valid_on_the_other(site):
    """A session made by one host opens streams on the other (one database, one SECRET_KEY)."""
    first, second = site.hosts
    session = login(first.url, "alice", PASSWORD)
    client = SSEClient(session, second.url + "/events/")
    try:
        assert client.status == 200, "the other host knows the session"
        (opened,) = client.wait_count("stream.open", 1)
        assert json.loads(opened.data)["channels"][0].startswith("user:"), "the user's own channel"
    finally:
        client.close()


def test_streams_spread_over_both_hosts_and_a_broadcast_reaches_each_once(site, logins):
    """Streams through nginx land on both hosts; one event published through nginx reaches every stream once."""
    channel = room()
    sessions = sessions_of(logins)
    clients = []
    try:
        for index in range(12):
            clients.append(site.stream(sessions[index % len(sessions)], channel))
        for client in clients:
            client.wait_count("stream.open", 1)
        placed = Counter(site.host_of(client).address for client in clients)
        assert placed == {host.address: 6 for host in site.hosts}, "round-robin alternates the hosts"
        assert [site.streams_on(host) for host in site.hosts] == [6, 6], (
            "each host counts the streams nginx says it has"
        )

        published = site.publish(channel, "to everyone")
        assert published.status_code == 200
        # The second event is published through the other host: it, too, reaches every stream.
        closing = site.publish(channel, "last")
        assert site.host_of(closing) is not site.host_of(published)
        for client in clients:
            client.wait_count("note", 2)
        for client in clients:
            assert notes(client.messages) == ["to everyone", "last"], "each event once, in order, on every stream"
            assert [m.last_event_id for m in client.of_type("note")] == [published.json()["id"], closing.json()["id"]]
    finally:
        for client in clients:
            client.close()


def test_a_reconnect_to_the_other_host_resumes_without_loss_or_duplicates(site):
    """A client whose reconnect lands on the other host gets what it missed exactly once, in order, then live events."""
    session, channel = site.login("alice"), room()
    first = site.stream(session, channel)
    first.wait_count("stream.open", 1)
    for n in range(3):
        assert site.publish(channel, n).status_code == 200
    first.wait_count("note", 3)
    first_host = site.host_of(first)
    first.close()
    for n in range(3, 13):
        assert site.publish(channel, n).status_code == 200, "published while the client is away"

    # Round-robin sends every other request to the other host; a reconnect
    # that lands on the same one is closed unread and tried again.
    attempts = []
    for _ in range(4):
        second = site.stream(session, channel, last_event_id=first.last_event_id)
        attempts.append(site.host_of(second).address)
        if site.host_of(second) is not first_host:
            break
        second.close()
    else:
        raise AssertionError(f"no reconnect reached the other host: {attempts}")
    try:
        second.wait_count("note", 10)
        for n in range(13, 15):
            assert site.publish(channel, n).status_code == 200
        second.wait_count("note", 12)
        assert json.loads(second.messages[0].data)["resumed"] is True
        assert notes(first.messages) + notes(second.messages) == list(range(15))
        assert not second.of_type("stream.reset")
    finally:
        second.close()


class RawStream:
    """A stream read from a plain socket through nginx, so the test decides when (and whether) it reads."""

    def __init__(self, balancer, session, channel, *, rcvbuf):
        cookies = "; ".join(f"{name}={value}" for name, value in session.cookies.items())
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: a small window
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", balancer.port))
        self.sock.sendall(
            f"GET /events/?channel={channel} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookies}\r\n\r\n".encode()
        )
        self.decoder = ChunkedDecoder()
        self.parser = SSEParser()
        self.messages = []
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += self.sock.recv(65536)
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 200"), lines[0]
        self.headers = {name: value for name, _, value in (line.partition(": ") for line in lines[1:])}
        self.messages.extend(self.parser.feed(self.decoder.feed(rest)))

    def read(self, until, timeout=20):
        """Read until ``until(messages)`` is true or the connection ends; return True if it ended."""
        deadline = time.monotonic() + timeout
        while not until(self.messages):
            assert time.monotonic() < deadline, f"timed out; got {len(self.messages)} messages"
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return True
            if not data:
                return True
            self.messages.extend(self.parser.feed(self.decoder.feed(data)))
        return False

    def close(self):
        self.sock.close()


def test_a_client_that_stops_reading_is_dropped_by_its_host_through_nginx(site):
    """nginx does not buffer streams (X-Accel-Buffering: no): a client that stops reading is dropped by its host.

    Were the stream buffered, nginx would read it on into memory and a
    temporary file (up to 1 GB per response by default) and the host would
    never see its client fall behind. The client resumes the rest once it
    reconnects.
    """
    session, channel = site.login("bob"), room()
    raw = RawStream(site.balancer, session, channel, rcvbuf=4096)
    try:
        raw.read(lambda ms: any(m.type == "stream.open" for m in ms))
        host = site.host_of(raw)
        wait_until(lambda: site.streams_on(host) == 1, timeout=15, what="the other tests' streams to be gone")
        # About 9.6 MB, published straight to the broker: more than the socket
        # buffers between the host, nginx and the client hold.
        broker = RedisBroker(url=host.env["REDIS_URL"])
        started = time.monotonic()
        try:
            ids = [format_id(broker.publish(channel, "note", f'"{n:03d}-{"x" * 48000}"')) for n in range(200)]
        finally:
            broker.close()
        wait_until(lambda: site.streams_on(host) == 0, timeout=30, interval=0.1, what="the host to drop the client")
        dropped_after = time.monotonic() - started
        assert raw.read(lambda ms: False), "nginx ends the client's connection too"
        assert not raw.decoder.ended, "cut, not ended: the client reconnects"
        got = [m.last_event_id for m in raw.messages if m.type == "note"]
        assert len(got) < len(ids), "the client was dropped before it got everything"
    finally:
        raw.close()
    again = site.stream(session, channel, last_event_id=raw.parser.last_event_id)
    try:
        again.wait_count("note", len(ids) - len(got), timeout=30)
        assert got + [m.last_event_id for m in again.of_type("note")] == ids, "every event once, in order"
    finally:
        again.close()
    print(f"dropped by its host {dropped_after:.1f} s after the burst began, having read {len(got)} of {len(ids)}")


class Connection:
    """One stream a Browser opened: its SSEClient, and when it opened and ended (monotonic seconds)."""

    def __init__(self, client):
        self.client = client
        self.opened_at = time.monotonic()
        self.ended_at = None


class Browser:
    """A client that reconnects like an EventSource, through nginx, on a thread of its own.

    After each end of its stream it waits the stream's ``retry`` and
    reconnects with its Last-Event-ID (a refused or failed attempt is retried
    the same way). ``connections`` holds every stream it opened.
    """

    def __init__(self, site, session, channel):
        self.site = site
        self.session = session
        self.url = f"{site.url}/events/?channel={channel}"
        self.connections = []
        self.failures = []  # status or exception text of attempts that got no stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        last_event_id, retry = None, 0.3  # seconds
        while not self._stop.is_set():
            try:
                client = SSEClient(self.session, self.url, last_event_id=last_event_id)
            except requests.RequestException as error:
                self.failures.append(repr(error))
                self._stop.wait(retry)
                continue
            if client.status != 200:
                self.failures.append(client.status)
                self._stop.wait(retry)
                continue
            connection = Connection(client)
            self.connections.append(connection)
            while not client.ended.wait(0.01):
                if self._stop.is_set():
                    client.close()
                    return
            connection.ended_at = time.monotonic()
            last_event_id = client.last_event_id or last_event_id
            retry = (client.parser.retry or 300) / 1000
            self._stop.wait(retry)

    @property
    def messages(self):
        return [message for connection in self.connections for message in connection.client.messages]

    @property
    def current(self):
        return self.connections[-1] if self.connections else None

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        for connection in self.connections:
            connection.client.close()


class Publisher:
    """Publishes events 0, 1, ... ``count - 1`` through nginx on a thread, one every ``interval`` seconds.

    Each event carries a publisher id, so the retry after a failed answer
    (a 502 or 504 from a host that took the request and died or hung) cannot
    publish it twice. ``ids[n]`` is the broker's id of event n; ``retries``
    lists the failed answers.
    """

    def __init__(self, site, channel, count, interval):
        self.site = site
        self.channel = channel
        self.count = count
        self.interval = interval
        self.tag = uuid.uuid4().hex[:8]
        self.ids = {}
        self.retries = []
        self._published = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def publish(self, n, site=None):
        """Publish event ``n`` once (through ``site``, default nginx); retry failures for up to 30 s."""
        deadline = time.monotonic() + 30
        while True:
            try:
                response = (site or self.site).publish(self.channel, n, id=f"{self.tag}-{n}")
                if response.status_code == 200:
                    break
                self.retries.append((n, response.status_code))
            except requests.RequestException as error:
                self.retries.append((n, repr(error)))
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        with self._published:
            self.ids[n] = response.json()["id"]
            self._published.notify_all()

    def _run(self):
        for n in range(self.count):
            self.publish(n)
            time.sleep(self.interval)

    def wait_for(self, n, timeout=30):
        """Wait until event ``n`` is published."""
        with self._published:
            assert self._published.wait_for(lambda: n in self.ids, timeout), f"event {n} was not published"

    def join(self, timeout=60):
        self._thread.join(timeout)


@pytest.fixture
def failure_site(tmp_path, shared):
    """Two hosts of the site behind an nginx of their own, for a test that kills or freezes one."""
    with _site(tmp_path, shared) as failure_site:
        yield failure_site


#: How a host fails: killed (the kernel closes its connections at once) or
#: frozen (its connections stay open and silent, as on a power loss or a
#: network partition, until nginx's proxy_read_timeout).
FAILURES = {"crash (SIGKILL)": "crash", "freeze (SIGSTOP)": "freeze"}


@pytest.mark.parametrize("failure", list(FAILURES.values()), ids=list(FAILURES))
def test_clients_of_a_failed_host_resume_on_the_other(failure_site, logins, failure):
    """A host fails while clients stream and events are published: its clients resume on the other, losing nothing.

    The frozen host comes back at the end: the publishes it took but never
    answered (retried on the other host with the same publisher id) are not
    delivered twice.
    """
    site, channel = failure_site, room()
    sessions = sessions_of(logins)
    browsers = [Browser(site, sessions[index % len(sessions)], channel) for index in range(6)]
    count, fail_at = 40, 15
    publisher = None
    victim, survivor = site.hosts
    try:
        wait_until(
            lambda: all(b.current and b.current.client.of_type("stream.open") for b in browsers),
            timeout=15,
            what="every stream open",
        )
        on_victim = [b for b in browsers if site.host_of(b.current.client) is victim]
        assert len(on_victim) == 3, "round-robin put half the streams on each host"

        publisher = Publisher(site, channel, count, interval=0.05)
        publisher.wait_for(fail_at)
        failed_at = time.monotonic()
        getattr(victim, failure)()

        def reopened():
            """Seconds from the failure to each victim client's live stream on the survivor, once all have one."""
            times = []
            for browser in on_victim:
                current = browser.current
                if current.opened_at < failed_at or site.host_of(current.client) is not survivor:
                    return None
                if not current.client.of_type("stream.open"):
                    return None
                times.append(current.opened_at - failed_at)
            return times

        reconnects = wait_until(reopened, timeout=30, what="the failed host's clients to reconnect")
        ends = [b.connections[0].ended_at - failed_at for b in on_victim]
        publisher.join()
        assert len(publisher.ids) == count, f"published {len(publisher.ids)} of {count}: {publisher.retries}"
        if failure == "freeze":
            victim.thaw()
            wait_until(lambda: site.answers(victim), timeout=15, what="the frozen host to answer again")
        # The last event, published through the host that failed once it is
        # back (or the survivor): after it, nothing more can arrive.
        publisher.publish(count, site=victim if failure == "freeze" else survivor)
        last = publisher.ids[count]
        wait_until(
            lambda: all(any(m.last_event_id == last for m in b.messages) for b in browsers),
            timeout=20,
            what="every client to receive the last event",
        )
        for browser in browsers:
            received = [(json.loads(m.data), m.last_event_id) for m in browser.messages if m.type == "note"]
            assert received == [(n, publisher.ids[n]) for n in range(count + 1)], "every event once, in order"
            assert not [m for m in browser.messages if m.type == "stream.reset"]
        for browser in set(browsers) - set(on_victim):
            assert len(browser.connections) == 1, "the survivor's own streams were not disturbed"
        failovers = sum("," in c.client.headers["X-Upstream"] for b in on_victim for c in b.connections[1:])
        print(
            f"{failure}: the failed host's streams ended {min(ends):.2f}-{max(ends):.2f} s after it failed, "
            f"live again on the survivor {min(reconnects):.2f}-{max(reconnects):.2f} s after "
            f"(retry {[b.connections[0].client.parser.retry for b in on_victim]} ms); "
            f"reconnects nginx tried on the failed host first: {failovers}; publish retries: {publisher.retries}"
        )
    finally:
        victim.thaw()
        if publisher is not None:
            publisher.join()
        for browser in browsers:
            browser.stop()
