"""A throw-away PostgreSQL cluster for the tests and the benchmark: `initdb` and
`pg_ctl` of the machine's PostgreSQL (15 on Debian: /usr/lib/postgresql/15/bin),
in a temporary folder, on a free TCP port of 127.0.0.1 and a Unix socket in that
folder. As root, the server programs run as the `postgres` user (PostgreSQL
refuses to run as root).

Failing to start it raises: the PostgreSQL tests fail rather than skip (CI installs
Debian's `postgresql` package where it is missing)."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg


def find_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    raise RuntimeError(f"PostgreSQL's {name} is not installed (Debian: apt-get install postgresql)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """initdb + pg_ctl in a temporary folder; `url(db)` for a database of it."""

    def __init__(self, fsync: bool = False, settings: dict | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="medsettle-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.fsync = fsync
        self.settings = settings or {}
        self._as = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd, check=True) -> subprocess.CompletedProcess:
        p = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        return p

    def init(self) -> "Cluster":
        self._run(find_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-locale")
        conf = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.folder}'", "fsync": "on" if self.fsync else "off",
                "full_page_writes": "on" if self.fsync else "off", "max_connections": "100",
                "shared_buffers": "'64MB'", **self.settings}
        with open(self.data / "postgresql.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        return self

    def start(self) -> "Cluster":
        self._run(find_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log"), "-w", "-t", "60",
                  "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(find_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def socket_url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@/{db}?host={self.folder}&port={self.port}"

    def create_database(self, name: str | None = None) -> str:
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return name

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


def start_cluster(**kw) -> Cluster:
    c = Cluster(**kw).init()
    try:
        return c.start()
    except BaseException:
        log = c.folder / "log"
        text = log.read_text()[-2000:] if log.exists() else ""
        c.destroy()
        raise RuntimeError(f"PostgreSQL did not start: {text}") from None
