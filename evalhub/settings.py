"""EvalHub settings: one file, every deployment-specific value read from the environment.

Embedded default (no variables set): SQLite and a Celery broker on a local SQLite file, both under
``EVALHUB_VAR_DIR`` (default ``./var``). Production: set ``DATABASE_URL`` (PostgreSQL),
``CELERY_BROKER_URL`` (Redis), ``SECRET_KEY`` (or ``SECRET_KEY_FILE``), ``ALLOWED_HOSTS`` and
``EVALHUB_HTTPS=true``; see compose.yaml. Malformed values fail loudly at start-up.
"""

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str | None = None) -> str | None:
    """A variable's value, or the contents of the file named by ``NAME_FILE`` (Docker secrets)."""
    if name in os.environ:
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path!r} cannot be read: {exc}") from exc
    return default


def env_bool(name: str, default: bool) -> bool:
    raw = env_str(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use true/false)")


def env_int(name: str, default: int) -> int:
    raw = env_str(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None


def env_list(name: str, default: list[str]) -> list[str]:
    raw = env_str(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


VAR_DIR = Path(env_str("EVALHUB_VAR_DIR", str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)
MEDIA_ROOT = VAR_DIR / "media"  # job outputs (exports, checkpoints) live here
MEDIA_URL = "/media/"
# Loaded models (generation backends, reward models) share one per-process LRU cache of this
# many bytes of tensors; an entry bigger than the budget still loads, alone. SmolLM2-135M in
# fp32 is ~0.55 GB, a MiniLM reward model ~0.09 GB.
MODEL_CACHE_BYTES = env_int("EVALHUB_MODEL_CACHE_BYTES", 4 * 2**30)
# LoRA adapters served on a loaded base (``models.adapters.AdapterCache``, the model cache's
# sibling with the same LRU rules): this many bytes of adapter factors per process, so swapping
# small adapters never evicts a base. A rank-16 fp32 adapter of SmolLM2-135M is ~16 MB.
ADAPTER_CACHE_BYTES = env_int("EVALHUB_ADAPTER_CACHE_BYTES", 512 * 2**20)

DEBUG = env_bool("DEBUG", False)


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        return key
    # Embedded profile: one random key per installation, kept beside the database. Never a fixed
    # default: a key that ships in the source would let anyone forge sessions.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()

# The inference server (``manage.py inferenceserver``, ``models/serving``): the one process that
# loads models for /v1, so web workers never do. The web app authenticates to it with this
# token, by default derived from SECRET_KEY so every process of one installation agrees.
INFERENCE_URL = env_str("EVALHUB_INFERENCE_URL", "http://127.0.0.1:8100").rstrip("/")
INFERENCE_TOKEN = (
    env_str("EVALHUB_INFERENCE_TOKEN")
    or hmac.new(SECRET_KEY.encode(), b"evalhub-inference", hashlib.sha256).hexdigest()
)
# Seconds /v1 waits for the server's answer: a model loading plus a long generation.
INFERENCE_TIMEOUT = env_int("EVALHUB_INFERENCE_TIMEOUT", 600)
# Most rows the server decodes together per model (continuous batching).
INFERENCE_MAX_BATCH = env_int("EVALHUB_INFERENCE_MAX_BATCH", 16)
# Generation jobs and eval runs: load the model in the Celery worker (False, the default: a
# job's big batches keep the worker busy on their own and never queue behind chat traffic),
# or send every call to the inference server (True: one copy of each model for the whole
# deployment, batches shared with /v1, for machines that cannot hold a second copy).
JOBS_USE_INFERENCE_SERVER = env_bool("EVALHUB_JOBS_USE_INFERENCE_SERVER", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "django_celery_beat",
    "evalhub",
    "grading",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "evalhub.urls"
WSGI_APPLICATION = "evalhub.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "core.access.roles_context",
            ],
        },
    },
]


def _database() -> dict:
    url = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}")
    try:
        db = dj_database_url.parse(url, conn_max_age=env_int("DB_CONN_MAX_AGE", 60))
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is malformed: {exc}") from exc
    if db["ENGINE"] == "django.db.backends.sqlite3":
        # The web server, the worker and beat write to one file: WAL lets readers run beside a
        # writer, IMMEDIATE transactions take the write lock up front instead of failing with
        # "database is locked" on upgrade, and the timeout waits out short write bursts.
        db["CONN_MAX_AGE"] = 0
        db["OPTIONS"] = {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    else:
        db["CONN_HEALTH_CHECKS"] = True
        if env_bool("DB_PREPARED_STATEMENTS", True):
            # Server-side binding lets psycopg prepare a statement after its 5th run on a
            # connection, so PostgreSQL plans it once instead of on every call: half the
            # database CPU of a label (benchmarks/grading_load.py). Turn it off behind a
            # transaction-pooling PgBouncer older than 1.21.
            db.setdefault("OPTIONS", {}).update(server_side_binding=True, prepare_threshold=5)
    return db


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "static")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        # Manifest storage needs collectstatic; tests and DEBUG serve files straight from apps.
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if env_bool("EVALHUB_MANIFEST_STATIC", not DEBUG)
        else "django.contrib.staticfiles.storage.StaticFilesStorage",
    },
}
WHITENOISE_USE_FINDERS = DEBUG or not env_bool("EVALHUB_MANIFEST_STATIC", not DEBUG)

# --- HTTPS hardening (production). The embedded profile runs on plain http://127.0.0.1 and sets
# EVALHUB_HTTPS=false; anything reachable from a network must sit behind TLS.
HTTPS = env_bool("EVALHUB_HTTPS", not DEBUG)
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = HTTPS
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = HTTPS
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if HTTPS else None
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # probes speak plain HTTP inside the cluster
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

# --- Celery. Jobs keep their own state in the Job table, so no result backend is needed.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", f"sqla+sqlite:///{VAR_DIR / 'broker.sqlite'}")
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True  # a task is acknowledged when it finishes, not when it starts…
CELERY_TASK_REJECT_ON_WORKER_LOST = True  # …so a killed worker's task is delivered again
CELERY_WORKER_PREFETCH_MULTIPLIER = 1  # one long job must not hold others hostage
CELERY_TASK_DEFAULT_QUEUE = "default"
# Each job kind names its queue (@job_task(queue=...)) and job_submit() routes by it; model-heavy
# kinds use "models", so those workers can run on machines with the memory for them.
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = (
    # Redis keeps an unacknowledged message for visibility_timeout seconds before another worker
    # may take it; it must exceed the longest job (hard time limit) or jobs run twice.
    {
        "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 4 * 3600),
        # Workers look for such orphaned messages every interval × throttle seconds (kombu's
        # defaults: 10 × 10). Lower both to recover sooner from a crashed worker.
        "unacked_restore_interval": env_int("CELERY_UNACKED_RESTORE_INTERVAL", 10),
        "unacked_restore_throttle": env_int("CELERY_UNACKED_RESTORE_THROTTLE", 10),
    }
    if CELERY_BROKER_URL.startswith(("redis://", "rediss://"))
    else {}
)
# A running job's worker writes a heartbeat every JOB_HEARTBEAT_SECONDS; after
# JOB_STALLED_AFTER_BEATS missed beats the job shows as stalled and the periodic sweep
# (core.jobs.sweep_stalled) re-queues it, or fails it once it has had JOB_MAX_ATTEMPTS attempts.
# Recovery takes about interval × (beats + 1), far below the visibility timeout.
JOB_HEARTBEAT_SECONDS = env_int("EVALHUB_JOB_HEARTBEAT_SECONDS", 15)
JOB_STALLED_AFTER_BEATS = env_int("EVALHUB_JOB_STALLED_AFTER_BEATS", 3)
JOB_MAX_ATTEMPTS = env_int("EVALHUB_JOB_MAX_ATTEMPTS", 3)
if JOB_HEARTBEAT_SECONDS < 1 or JOB_STALLED_AFTER_BEATS < 2 or JOB_MAX_ATTEMPTS < 1:
    raise ImproperlyConfigured(
        "EVALHUB_JOB_HEARTBEAT_SECONDS must be ≥ 1, EVALHUB_JOB_STALLED_AFTER_BEATS ≥ 2 "
        "(one late beat is not a dead worker) and EVALHUB_JOB_MAX_ATTEMPTS ≥ 1"
    )
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 3 * 3600)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 3 * 3600 + 300)
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TIMEZONE = TIME_ZONE

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
