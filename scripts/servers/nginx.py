"""The system's nginx as a round-robin load balancer (``Nginx``)."""

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from . import ServerError, _wait_for

#: nginx.conf for ``Nginx``; the values in braces are filled in by ``Nginx.start``.
NGINX_CONF = """\
# Written by scripts/servers/nginx.py (Nginx): a load balancer in front of the push
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
