"""Run the web server, the inference server, a Celery worker and Celery beat together;
Ctrl-C stops all of them.

They are real separate processes (not eager mode), exactly as in production; only the
database and broker default to local files. Models for /v1 load in the inference server
alone; gunicorn runs threaded workers that only check and forward those requests, so a long
generation holds a thread, never a whole worker, and never trips gunicorn's worker timeout.
"""

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Start gunicorn, the inference server, a Celery worker (default and models) and beat."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1:8000")
        # gunicorn's advice: (2 x cores) + 1 workers, each with threads for slow /v1 answers
        parser.add_argument("--web-workers", type=int, default=2 * (os.cpu_count() or 1) + 1)
        parser.add_argument("--web-threads", type=int, default=8)
        parser.add_argument("--concurrency", type=int, default=2)

    def handle(
        self, *args, bind: str, web_workers: int, web_threads: int, concurrency: int, **options
    ):
        py = sys.executable
        celery = [py, *"-m celery -A evalhub".split()]
        commands = {
            "web": [py, "-m", "gunicorn", "evalhub.wsgi", "--preload", "--bind", bind,
                    "--workers", str(web_workers), "--worker-class", "gthread",
                    "--threads", str(web_threads), "--access-logfile", "-",
                    # idle keep-alive connections hold a threaded worker's exit; stop in time
                    "--graceful-timeout", "10"],
            "inference": [py, str(settings.BASE_DIR / "manage.py"), "inferenceserver"],
            "worker": [*celery, "worker", "-Q", "default,models", "--concurrency",
                       str(concurrency), "--loglevel", "INFO"],
            "beat": [*celery, "beat", "--loglevel", "INFO",
                     "--schedule", str(settings.VAR_DIR / "celerybeat-schedule")],
        }  # fmt: skip
        # Own sessions: a terminal's Ctrl-C reaches only this supervisor, which then stops each
        # child once, in order, with the signal that means "finish cleanly" to it.
        procs = {
            name: subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True)
            for name, cmd in commands.items()
        }
        self.stdout.write(
            self.style.SUCCESS(f"EvalHub is running at http://{bind}/ (Ctrl-C stops)")
        )
        stopping = False

        def stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            while not stopping:
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        self.stderr.write(f"{name} exited with code {proc.returncode}; stopping")
                        stopping = True
                time.sleep(0.5)
        finally:
            self._shutdown(procs)

    def _shutdown(self, procs) -> None:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown: workers finish or requeue
        deadline = time.monotonic() + 20
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.stderr.write(f"{name} did not stop in time; killing it")
                proc.kill()
                proc.wait()
        self.stdout.write("EvalHub stopped.")
