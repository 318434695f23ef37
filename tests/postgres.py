"""A throwaway PostgreSQL server for the tests: `initdb` + `pg_ctl` in a temp dir, listening
on a free loopback port, stopped and deleted at the end.

PostgreSQL refuses to run as root, so under root (as on CI) the server runs as the
unprivileged user `nobody`, in a directory that user owns. Each test gets a database of its
own (`create_database`), dropped afterwards.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

from tinkerd_testing import free_port

SUPERUSER = "tinkerd"
UNPRIVILEGED_USER = "nobody"  # who runs the server when the tests run as root


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl of one PostgreSQL version, or None."""
    candidates = [shutil.which("initdb"), "/usr/local/bin/initdb",
                  *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key, reverse=True)]
    for initdb in candidates:
        if initdb and os.access(initdb, os.X_OK):
            bin_dir = Path(os.path.realpath(initdb)).parent  # pg_ctl of the same version
            if os.access(bin_dir / "pg_ctl", os.X_OK) and os.access(bin_dir / "postgres", os.X_OK):
                return bin_dir
    return None


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _world_traversable(directory: Path) -> bool:
    """Whether another user can reach files under `directory` (every ancestor has o+x)."""
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in [directory, *directory.parents])


class PostgresServer:
    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.port = 0
        self.root: Path | None = None
        self._run_as: str | None = None
        self._started = False

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """A PostgreSQL program, as the user that owns the cluster."""
        user_kw = {"user": self._run_as, "group": pwd.getpwnam(self._run_as).pw_gid} if self._run_as else {}
        return subprocess.run([str(self.bin_dir / args[0]), *args[1:]], cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "LC_ALL": "C"}, **user_kw)

    def start(self) -> PostgresServer:
        base = Path(tempfile.gettempdir())
        if os.geteuid() == 0:
            self._run_as = UNPRIVILEGED_USER
            pwd.getpwnam(self._run_as)  # KeyError: no such user here
            if not _world_traversable(base):
                base = Path("/tmp")
        self.root = Path(tempfile.mkdtemp(prefix="tinkerd-pg-", dir=base))
        if self._run_as:
            os.chown(self.root, pwd.getpwnam(self._run_as).pw_uid, -1)
        made = self._run("initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                         "--locale=C", "--no-sync")
        if made.returncode != 0:
            self.stop()
            raise RuntimeError(f"initdb failed ({made.returncode}):\n{made.stdout}\n{made.stderr}")
        for _attempt in range(3):  # another process may take the free port before the server binds it
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c max_connections=200 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            started = self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.root / "server.log"), "-w",
                                "-t", "60", "-o", options, "start", timeout=90)
            if started.returncode == 0:
                self._started = True
                return self
        log = (self.root / "server.log").read_text(errors="replace")[-3000:] if (self.root / "server.log").exists() else ""
        self.stop()
        raise RuntimeError(f"pg_ctl start failed:\n{started.stdout}\n{started.stderr}\n{log}")

    def stop(self) -> None:
        if self._started:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
            self._started = False
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres", autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # FORCE: ends connections a test left open
