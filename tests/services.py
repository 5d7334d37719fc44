"""Real processes for integration tests: Celery workers and gunicorn on this machine's services.

They run the very commands compose.yaml runs, pointed at pytest-django's test database (so the
test must use ``transactional_db``/``live_server``: data has to be committed to be seen).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def test_database_url() -> str:
    s = connection.settings_dict
    assert s["ENGINE"] == "django.db.backends.postgresql", (
        "integration tests need PostgreSQL: run them with `make test` (DATABASE_URL)"
    )
    return f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def redis_url() -> str:
    return os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def service_env(**extra) -> dict:
    env = os.environ.copy()
    env.update(
        DATABASE_URL=test_database_url(),
        CELERY_BROKER_URL=redis_url(),
        EVALHUB_HTTPS="false",
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A child process in its own process group, so kill() takes its pool children too."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        self._out = open(log, "ab")
        self.popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        self._out.close()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


# The production commands, shared with compose.yaml (a test checks they agree).
WORKER_ARGS = (
    "-m celery -A evalhub worker -Q default,models --concurrency 1 --loglevel INFO"
).split()
WEB_ARGS = (
    "-m gunicorn evalhub.wsgi --preload --bind {bind} --workers 5"
    " --worker-class gthread --threads 8"
).split()
INFERENCE_ARGS = "manage.py inferenceserver --host 0.0.0.0".split()
BEAT_ARGS = "-m celery -A evalhub beat --loglevel INFO".split()


def start_worker(tmp_path: Path, name: str, **env) -> Proc:
    args = [sys.executable, *WORKER_ARGS, "--hostname", f"{name}@%h"]
    proc = Proc(args, service_env(**env), tmp_path / f"{name}.log")
    wait_for(lambda: "ready." in proc.output(), 60, f"worker {name} to start", proc)
    return proc


def start_beat(tmp_path: Path, **env) -> Proc:
    """Celery beat on the database schedule (the periodic tasks the test has created)."""
    args = [sys.executable, *BEAT_ARGS]
    proc = Proc(args, service_env(**env), tmp_path / "beat.log")
    wait_for(lambda: "Starting..." in proc.output(), 60, "beat to start", proc)
    return proc


def start_gunicorn(tmp_path: Path, **env) -> tuple[Proc, str]:
    port = free_port()
    args = [sys.executable, *(a.format(bind=f"127.0.0.1:{port}") for a in WEB_ARGS)]
    proc = Proc(args, service_env(**env), tmp_path / "gunicorn.log")
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code in (200, 503)
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "gunicorn to answer", proc)
    return proc, base


def wait_for(predicate, timeout: float, what: str, proc: Proc | None = None, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.popen.poll() is not None:
            raise AssertionError(f"process died while waiting for {what}:\n{proc.output()[-3000:]}")
        time.sleep(every)
    tail = proc.output()[-3000:] if proc else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail}")
