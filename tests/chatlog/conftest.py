"""The chat log's fixtures: a turn to write, a SQLite log in a temp folder, a throwaway PostgreSQL server, the CLI."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from castbot.chatlog.store import ChatLog, TurnRecord
from tests.conftest import REPO, free_port

NOW = datetime.now(UTC)


def turn(conversation: str = "c1", model: str = "ada-bot", when: datetime = NOW, message: str = "Where is the fuel?",
         **changes) -> TurnRecord:
    record = TurnRecord(turn_id=uuid.uuid4().hex, conversation_id=conversation, time=when, endpoint="chat",
                        message=message, reply="In the numbers.", history_turns=2, model_name=model,
                        model_version="3", character="Ada", engine="transformers", prompt_tokens=17, new_tokens=5,
                        latency_s=0.25, ttft_s=None, finish_reason="stop")
    for key, value in changes.items():
        setattr(record, key, value)
    return record


@pytest.fixture
def log(tmp_path) -> ChatLog:
    log = ChatLog(f"sqlite:///{tmp_path / 'chatlog.db'}")
    yield log
    log.close()


def cli(*args: str, url: str, retention_days: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CASTBOT_CHATLOG_URL": url}
    env.pop("CASTBOT_CHATLOG_RETENTION_DAYS", None)
    if retention_days:
        env["CASTBOT_CHATLOG_RETENTION_DAYS"] = retention_days
    return subprocess.run([sys.executable, "-m", "castbot.chatlog", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


class PostgresServer:
    """initdb + postgres from the machine's PostgreSQL packages, on a free port; stop() and start() again keep
    its data (an outage and a recovery)."""

    def __init__(self, initdb: str):
        self.folder = Path(tempfile.mkdtemp(prefix="castbot-pg-"))  # not under pytest's root-only 0700 folder
        self.folder.chmod(0o777)
        # initdb refuses to run as root: run the server as the postgres user then
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.data, self.port = self.folder / "data", free_port()
        subprocess.run([*self.as_user, initdb, "-D", str(self.data), "-A", "trust", "-U", "castbot"], check=True,
                       capture_output=True, timeout=120)
        self.postgres = str(Path(initdb).with_name("postgres"))
        self.url = f"postgresql+psycopg://castbot:pw@127.0.0.1:{self.port}/postgres"
        self.server: subprocess.Popen | None = None

    def start(self) -> None:
        self.server = subprocess.Popen([*self.as_user, self.postgres, "-D", str(self.data), "-p", str(self.port),
                                        "-h", "127.0.0.1", "-k", str(self.folder)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        engine = sa.create_engine(self.url)
        try:
            for _ in range(240):
                try:
                    with engine.connect():
                        return
                except sa.exc.OperationalError:
                    time.sleep(0.25)
            raise RuntimeError(f"PostgreSQL did not start on port {self.port}")
        finally:
            engine.dispose()

    def stop(self) -> None:
        os.killpg(self.server.pid, signal.SIGINT)  # fast shutdown: clients are disconnected
        self.server.wait(timeout=60)


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """A throwaway PostgreSQL server for the chat log's tests."""
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if not initdb:
        pytest.skip("PostgreSQL server binaries (initdb) are not installed: apt-get install postgresql")
    server = PostgresServer(str(initdb))
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres) -> str:
    """A fresh database on the throwaway server (each test starts from an empty log)."""
    name = f"log_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"
