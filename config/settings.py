"""Django settings for the push service and its demo.

Environment:
- DATABASE_URL: Django's database (dj-database-url syntax); default SQLite in var/.
- DATABASE_POOL_SIZE: PostgreSQL only, most pooled connections per process; default 10.
- DATABASE_POOL_TIMEOUT: PostgreSQL only, seconds a request waits for a pooled
  connection before its 503 (or BrokerUnavailable); default 5.
- REDIS_URL: the Redis/Valkey server for the Redis broker; default redis://127.0.0.1:6379/0.
- REDIS_SENTINELS: comma-separated host:port of Redis Sentinels; set, the Redis broker asks
  them for the primary (REDIS_URL then gives only its database, username, password, TLS).
- REDIS_SENTINEL_SERVICE: the primary's name at the Sentinels; default mymaster.
- REDIS_CLUSTER_NODES: redis_cluster only, comma-separated host:port of cluster nodes to read
  the slot map from; REDIS_CLUSTER_PARTITIONS: its partitions (default 16).
- MYAPP_BROKER_BACKEND: redis (default), redis_cluster, postgres or memory.
- MYAPP_BROKER_DATABASE_URL: postgres only, a PostgreSQL server of its own for the
  broker (database alias "broker"); default: the broker uses Django's database.
- MYAPP_DURABLE_PUBLISH (1 or 0), MYAPP_OUTBOX_RELAY_IN_WORKERS (1 or 0),
  MYAPP_OUTBOX_POLL_SECONDS: the outbox settings (docs/settings.md).
- MYAPP_HISTORY_LENGTH: events the broker keeps per channel; default 1000.
- DJANGO_SECRET_KEY, DJANGO_DEBUG, DJANGO_ALLOWED_HOSTS (comma-separated).
- MYAPP_PUBLISH_TOKENS: comma-separated bearer tokens for the publish API.
- MYAPP_METRICS_TOKEN: the bearer token for /metrics; unset: metrics off (404).
- IMPORT_STEP_SECONDS: seconds per step of the demo import job.
"""

import os
import secrets
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("MYAPP_VAR_DIR", BASE_DIR / "var"))


def _secret_key():
    if key := os.environ.get("DJANGO_SECRET_KEY"):
        return key
    # A development key kept in the git-ignored var/ so sessions survive restarts.
    path = VAR_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(50)
        path.write_text(key)
        return key


SECRET_KEY = _secret_key()
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_tasks",
    "django_tasks_db",
    "myapp",
    # Durable publishing (the outbox table and its relay): the demo job
    # publishes with send_event(..., durable=True).
    "myapp.outbox",
    "worker_tasks",
    # The demo site itself: its templates, static files and demo_user command.
    "config",
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
    "myapp.middleware.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

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
            ],
        },
    },
]

VAR_DIR.mkdir(parents=True, exist_ok=True)
DATABASES = {"default": dj_database_url.parse(os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}
if os.environ.get("MYAPP_BROKER_DATABASE_URL"):
    DATABASES["broker"] = dj_database_url.parse(os.environ["MYAPP_BROKER_DATABASE_URL"])
for database in DATABASES.values():
    if database["ENGINE"] == "django.db.backends.sqlite3":
        # gunicorn and the task worker write at the same time: WAL lets readers go
        # on, IMMEDIATE avoids lock upgrades that fail at once.
        database["OPTIONS"] = {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
        continue
    options = database.setdefault("OPTIONS", {})
    options.setdefault("connect_timeout", 5)  # seconds
    # A pool per process (psycopg_pool, Django >= 5.1): thousands of streams
    # opening at once share a few connections for their session lookups
    # instead of exhausting max_connections. A request waits up to `timeout`
    # seconds for a free connection; while the database is down no
    # connection comes, so this is also how long every request and every
    # send_event waits before its 503 / BrokerUnavailable. Kept as short as
    # connect_timeout.
    # The pool retries a failed connect with doubling delays (1, 2, 4, 8 ...
    # s) for up to `reconnect_timeout` seconds (psycopg_pool's default: 300):
    # after a one-minute outage it would stay down up to a minute longer than
    # the database. 10 s caps the delay at 4 s; after that the next request
    # starts a new attempt at once.
    options.setdefault(
        "pool",
        {
            "min_size": 1,
            "max_size": int(os.environ.get("DATABASE_POOL_SIZE", "10")),
            "timeout": float(os.environ.get("DATABASE_POOL_TIMEOUT", "5")),  # seconds
            "reconnect_timeout": 10.0,  # seconds
        },
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "index"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
# Serve straight from the apps' static/ folders: no collectstatic step to run.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

TASKS = {
    "default": {
        "BACKEND": "django_tasks_db.DatabaseBackend",
        "QUEUES": ["default"],
    }
}


def _host_ports(value):
    """Turn "host:port,host:port" into [[host, port], ...]; a bracketed IPv6 host keeps its colons."""
    return [
        [host.strip("[]"), int(port)] for host, _, port in (item.strip().rpartition(":") for item in value.split(","))
    ]


_BROKERS = {
    "redis": {
        "BACKEND": "myapp.brokers.redis.RedisBroker",
        "OPTIONS": {"url": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")},
    },
    "redis_cluster": {"BACKEND": "myapp.brokers.redis_cluster.RedisClusterBroker", "OPTIONS": {}},
    "postgres": {"BACKEND": "myapp.brokers.postgres.PostgresBroker", "OPTIONS": {}},
    "memory": {"BACKEND": "myapp.brokers.memory.MemoryBroker", "OPTIONS": {}},
}
_backend = os.environ.get("MYAPP_BROKER_BACKEND", "redis")
if _backend not in _BROKERS:
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(f"MYAPP_BROKER_BACKEND={_backend!r}: use one of {', '.join(_BROKERS)}")
MYAPP_BROKER = _BROKERS[_backend]
if _backend == "redis" and os.environ.get("REDIS_SENTINELS"):
    MYAPP_BROKER["OPTIONS"]["sentinels"] = _host_ports(os.environ["REDIS_SENTINELS"])
    MYAPP_BROKER["OPTIONS"]["service_name"] = os.environ.get("REDIS_SENTINEL_SERVICE", "mymaster")
if _backend == "redis_cluster":
    MYAPP_BROKER["OPTIONS"]["startup_nodes"] = _host_ports(os.environ.get("REDIS_CLUSTER_NODES", "127.0.0.1:7000"))
    MYAPP_BROKER["OPTIONS"]["partitions"] = int(os.environ.get("REDIS_CLUSTER_PARTITIONS", "16"))
if "MYAPP_HISTORY_LENGTH" in os.environ:  # events kept per channel (the broker's history_length)
    MYAPP_BROKER["OPTIONS"]["history_length"] = int(os.environ["MYAPP_HISTORY_LENGTH"])
if _backend == "postgres":
    # The PostgreSQL broker's tables: only a project that uses it migrates them.
    INSTALLED_APPS.append("myapp.brokers.postgres")
    if "broker" in DATABASES:  # a server of its own (migrate --database broker)
        MYAPP_BROKER["OPTIONS"]["database"] = "broker"
MYAPP_CHANNEL_AUTHORIZER = "config.demo.authorize_channel"
MYAPP_PUBLISH_TOKENS = [token for token in os.environ.get("MYAPP_PUBLISH_TOKENS", "").split(",") if token]
# Who is in each room, across workers and hosts (myapp.presence), with join/leave events.
MYAPP_PRESENCE_CHANNELS = [p for p in os.environ.get("MYAPP_PRESENCE_CHANNELS", "room:*").split(",") if p]
MYAPP_PRESENCE_EVENTS = True
MYAPP_METRICS_TOKEN = os.environ.get("MYAPP_METRICS_TOKEN") or None
# Numeric MYAPP_* settings may come from the environment (see docs/settings.md).
for _name, _type in (
    ("MYAPP_HEARTBEAT_SECONDS", float),
    ("MYAPP_RETRY_MILLISECONDS", int),
    ("MYAPP_STREAM_QUEUE_SIZE", int),
    ("MYAPP_SEND_TIMEOUT_SECONDS", float),
    ("MYAPP_STREAM_LIFETIME_SECONDS", float),
    ("MYAPP_MAX_STREAMS_PER_USER", int),
    ("MYAPP_MAX_STREAMS_PER_WORKER", int),
    ("MYAPP_MAX_CHANNELS_PER_STREAM", int),
    ("MYAPP_PUBLISH_MAX_BODY_BYTES", int),
):
    if _name in os.environ:
        globals()[_name] = _type(os.environ[_name])
# The outbox (durable publishing, docs/outbox.md).
MYAPP_DURABLE_PUBLISH = os.environ.get("MYAPP_DURABLE_PUBLISH", "0") == "1"
MYAPP_OUTBOX_RELAY_IN_WORKERS = os.environ.get("MYAPP_OUTBOX_RELAY_IN_WORKERS", "1") == "1"
if "MYAPP_OUTBOX_POLL_SECONDS" in os.environ:  # seconds
    MYAPP_OUTBOX_POLL_SECONDS = float(os.environ["MYAPP_OUTBOX_POLL_SECONDS"])

# The demo import job: seconds per imported row.
IMPORT_STEP_SECONDS = float(os.environ.get("IMPORT_STEP_SECONDS", "0.5"))

LOGGING = {
    "version": 1,
    # Keep gunicorn's own loggers alive (False silences its error log).
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "myapp": {"handlers": ["console"], "level": os.environ.get("MYAPP_LOG_LEVEL", "INFO"), "propagate": False},
        "worker_tasks": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
