"""Clarion settings: every value comes from the environment (and `.env` when present), read
here once; embedded defaults (SQLite and a local Redis under var/) when nothing is set."""

from __future__ import annotations

import os
import secrets
import warnings
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from project import embedded_redis

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").exists():
    environ.Env.read_env(BASE_DIR / ".env")

VAR_DIR = Path(env.str("CLARION_VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

# Prometheus multiprocess mode: every process (API servers, each Celery pool child) writes its
# metrics to files here and /metrics adds them up. prometheus_client reads the variable when
# it is imported, and settings load before any Clarion code imports it, so setting it here
# covers every process. One directory per host (or container), never shared between them;
# empty it when the whole service (re)starts on that host, not while any process runs.
PROMETHEUS_MULTIPROC_DIR = env.str("PROMETHEUS_MULTIPROC_DIR", default=str(VAR_DIR / "prometheus"))
Path(PROMETHEUS_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = PROMETHEUS_MULTIPROC_DIR

# Embedded mode: no database configured, so this is a developer's machine or a fresh clone.
EMBEDDED = "DATABASE_URL" not in env
DEBUG = env.bool("DEBUG", default=False)


def _embedded_secret_key() -> str:
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


if "SECRET_KEY" in env:
    SECRET_KEY = env.str("SECRET_KEY")
elif EMBEDDED:
    SECRET_KEY = _embedded_secret_key()
else:
    raise ImproperlyConfigured("SECRET_KEY must be set when DATABASE_URL is set")

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
PORT = env.int("PORT", default=8000)
FLOWER_PORT = env.int("FLOWER_PORT", default=5555)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "notifications",
    "workers",
    "channels_app",
]

MIDDLEWARE = [
    # Outermost, so request_id, the request log line and the metrics cover every answer.
    "notifications.api.middleware.RequestContextMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ (the browser client, the admin's assets): uvicorn serves no files.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.middleware.common.CommonMiddleware",
    # Sessions, CSRF, the session user, messages and X-Frame-Options, for the admin and the
    # browser pages only: /api/v1/ authenticates by key and skips them.
    "notifications.api.middleware.BrowserOnlyMiddleware",
    # Innermost and sync-only, so the whole chain runs in one sync thread instead of switching
    # between the event loop and threads around each hook; it still answers 413 before any
    # view reads the body (Content-Length only).
    "notifications.api.middleware.BodySizeLimitMiddleware",
]

# The admin's checks look for its middleware in MIDDLEWARE itself; they run, inside
# BrowserOnlyMiddleware, for every request outside /api/v1/ (tests/notifications/test_admin.py
# logs in and uses the admin through them).
SILENCED_SYSTEM_CHECKS = ["admin.E408", "admin.E409", "admin.E410"]

ROOT_URLCONF = "project.urls"
ASGI_APPLICATION = "project.asgi.application"
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

# --- Database -------------------------------------------------------------------------------
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'clarion.sqlite3'}")}
_db = DATABASES["default"]
if _db["ENGINE"] == "django.db.backends.sqlite3":
    _db["OPTIONS"] = {
        # IMMEDIATE takes the write lock at BEGIN, so concurrent writers queue on the busy
        # timeout instead of failing with "database is locked" mid-transaction.
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # Worker processes started by the tests open the test database by path.
    _db["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}
elif _db["ENGINE"].startswith("django.db.backends.postgresql") and env.bool(
    "DATABASE_POOL", default=True
):
    # psycopg 3 connection pool per process; CONN_MAX_AGE must stay 0 with a pool.
    _db["OPTIONS"] = {
        "pool": {
            "min_size": env.int("DATABASE_POOL_MIN", default=1),
            "max_size": env.int("DATABASE_POOL_MAX", default=10),
            "timeout": env.float("DATABASE_POOL_TIMEOUT", default=10.0),
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Each process re-reads the database's clock this often, off the request path, for the due
# times it computes in Python (core/db_clock.py): its estimate then drifts by no more
# than the monotonic clock does in that time (microseconds), at one short connection a period.
DB_CLOCK_REFRESH_SECONDS = env.float("DB_CLOCK_REFRESH_SECONDS", default=30.0)
# A host whose wall clock is this far from the database's says so in its log: due times do
# not follow it, but its log lines and informational stamps are off by as much.
DB_CLOCK_WARN_SECONDS = env.float("DB_CLOCK_WARN_SECONDS", default=1.0)

# --- Connections that go silent -------------------------------------------------------------
# A connection can go half-open: a NAT or firewall forgets the flow, a load balancer fails
# over, a VM is paused. Bytes sent are swallowed, nothing is closed, and TCP reports nothing
# for hours. Every Redis and broker command therefore has a deadline, after which the
# connection is dropped and the next command opens a new one (redis-py and kombu both do).
# Commands Clarion sends are sub-millisecond; 5 s is far beyond a slow Redis and short
# enough that a silent one costs one round of work, not the afternoon.
REDIS_SOCKET_TIMEOUT_SECONDS = env.float("REDIS_SOCKET_TIMEOUT_SECONDS", default=5.0)
REDIS_CONNECT_TIMEOUT_SECONDS = env.float("REDIS_CONNECT_TIMEOUT_SECONDS", default=5.0)
# redis-py PINGs a pooled connection that sat idle longer than this before using it again, so
# a connection that died while idle fails its PING, not the caller's command. kombu also uses
# it as the interval of its own checks of the consumer's BRPOP and pub/sub connections: a
# consumer whose BRPOP went silent reconnects within the poll timeout + 2 x this.
REDIS_HEALTH_CHECK_SECONDS = env.int("REDIS_HEALTH_CHECK_SECONDS", default=10)
# Redis broker: an idle worker's BRPOP waits this long on the server before it asks again. A
# message wakes it at once, so this is no delay; it is how often an idle worker wakes (kombu's
# default of 1 s costs each idle worker a round trip a second). kombu's check of a silent
# BRPOP connection then acts after this + REDIS_HEALTH_CHECK_SECONDS.
BROKER_POLL_SECONDS = env.float("BROKER_POLL_SECONDS", default=10.0)
# RabbitMQ: AMQP heartbeats find a dead connection in two missed intervals (Celery's default
# of 120 s would take four minutes).
BROKER_HEARTBEAT_SECONDS = env.int("BROKER_HEARTBEAT_SECONDS", default=30)

# --- Redis: cache, broker, channel layer ----------------------------------------------------
if "REDIS_URL" in env:
    REDIS_URL = env.str("REDIS_URL")
    _redis_socket = None
else:
    _redis_socket = embedded_redis.ensure_running(VAR_DIR)
    REDIS_URL = f"unix://{_redis_socket}"

CELERY_BROKER_URL = env.str(
    "CELERY_BROKER_URL",
    default=f"redis+socket://{_redis_socket}" if _redis_socket else REDIS_URL,
)

CACHES = {
    "default": {
        # Django's RedisCache, but one pool and one client per process (project/redis_cache.py
        # says why): under ASGI the stock one opens a connection per request.
        "BACKEND": "project.redis_cache.SharedPoolRedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "clarion",
        # A cache call waits at most 2 s: the API degrades to the database rather than hang.
        "OPTIONS": {
            "socket_timeout": 2,
            "socket_connect_timeout": 2,
            "health_check_interval": REDIS_HEALTH_CHECK_SECONDS,
        },
    }
}

CHANNEL_LAYERS = {
    "default": {
        # channels-redis's pub/sub layer, one subscription per server process
        # (channels_app/layer.py says what it changes and why).
        "BACKEND": "channels_app.layer.LiveChannelLayer",
        "CONFIG": {
            "hosts": [
                {
                    "address": REDIS_URL,
                    "socket_timeout": env.float("CHANNEL_LAYER_SOCKET_TIMEOUT", default=15.0),
                    "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_SECONDS,
                    # Also the subscription's: PINGed when idle this often, and reconnected
                    # (every group subscribed again) when nothing answers for 5 s more.
                    "health_check_interval": REDIS_HEALTH_CHECK_SECONDS,
                    # redis-py's asyncio pool refuses a command beyond its size (it does not
                    # wait): the bound on publishes of one process in flight at once.
                    "max_connections": env.int("CHANNEL_LAYER_MAX_CONNECTIONS", default=1000),
                }
            ],
            "prefix": "clarion-ws:",
        },
    }
}

# Cache lifetimes from the design (seed diagram 6); every write invalidates its entry.
CACHE_TTL_PREFERENCES = env.int("CACHE_TTL_PREFERENCES", default=300)
CACHE_TTL_TEMPLATES = env.int("CACHE_TTL_TEMPLATES", default=3600)
CACHE_TTL_DEVICES = env.int("CACHE_TTL_DEVICES", default=600)
CACHE_TTL_API_KEYS = env.int("CACHE_TTL_API_KEYS", default=300)
# In front of Redis, each process keeps API keys, templates and recipients for this long (0:
# off), and reads the shared version that every change increments at most this often: the
# process that made a change sees it at once, the others within CACHE_LOCAL_CHECK_SECONDS.
CACHE_LOCAL_SECONDS = env.float("CACHE_LOCAL_SECONDS", default=30.0)
CACHE_LOCAL_CHECK_SECONDS = env.float("CACHE_LOCAL_CHECK_SECONDS", default=0.1)
CACHE_LOCAL_MAX_ENTRIES = env.int("CACHE_LOCAL_MAX_ENTRIES", default=10_000)

# --- API ------------------------------------------------------------------------------------
IDEMPOTENCY_TTL_SECONDS = env.int("IDEMPOTENCY_TTL_SECONDS", default=86400)
# How long a request may hold an idempotency key "in flight" before another may take it over
# (a process that died mid-request must not lock the key for a whole day).
IDEMPOTENCY_LOCK_SECONDS = env.int("IDEMPOTENCY_LOCK_SECONDS", default=60)
# Largest accepted request body; bulk requests carry up to 1000 items.
API_MAX_BODY_BYTES = env.int("API_MAX_BODY_BYTES", default=256 * 1024)
API_MAX_BULK_BODY_BYTES = env.int("API_MAX_BULK_BODY_BYTES", default=8 * 1024 * 1024)
API_BULK_MAX_ITEMS = 1000
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BULK_BODY_BYTES

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["notifications.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["notifications.api.parsers.LimitedJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "notifications.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_THROTTLE_CLASSES": ["notifications.api.throttling.ApiKeyRateThrottle"],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Clarion API",
    "DESCRIPTION": "Multi-channel notification service: email, SMS, push and in-app.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # Swagger UI and Redoc come from the pinned drf-spectacular-sidecar package through
    # WhiteNoise: the docs pages work without internet access and cannot change under us.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # No badge from validator.swagger.io: the page stays on this host.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    # Enum components named for what they are (a generated client's class names), not for the
    # first field that used them (ReasonEnum, UnlessEnum).
    "ENUM_NAME_OVERRIDES": {
        "ChannelEnum": "notifications.models.CHANNEL_ORDER",
        "DeadLetterFilterStatusEnum": "notifications.api.serializers.DEAD_LETTER_FILTER_STATUSES",
        "AttemptOutcomeEnum": "notifications.models.AttemptOutcome.values",
        "DevicePlatformEnum": "notifications.models.DevicePlatform",
        "EscalationConditionEnum": "notifications.schedules.ESCALATION_CONDITIONS",
        "SuppressionReasonEnum": "notifications.models.SuppressionReason.values",
        "WebhookEventTypeEnum": "notifications.models.WebhookEventType.values",
    },
    # One tag per resource, in this order in Swagger UI; each operation gets the tag of its
    # path (notifications.api.schema.tag_by_resource), and a path whose tag is not here fails
    # the schema.
    "TAGS": [
        {
            "name": "notifications",
            "description": "Send to a recipient or a topic, or up to 1000 at once; an "
            "Idempotency-Key makes a retry safe. Read the status of each channel's delivery; "
            "cancel what has not gone out.",
        },
        {
            "name": "templates",
            "description": "What is sent on each channel (Jinja over the notification's data), "
            "with translations, frequency caps, escalation steps and digests.",
        },
        {
            "name": "recipients",
            "description": "Contact data, preferences (opt-outs, quiet hours), push devices, "
            "the browser token for the inbox, and erasure.",
        },
        {
            "name": "topics",
            "description": "Topics and their subscribers: a notification to a topic goes to "
            "every subscriber.",
        },
        {
            "name": "inbox",
            "description": "One recipient's in-app inbox, for the recipient's own browser: "
            "authenticated by the token of POST /api/v1/recipients/{rid}/token, not an API key.",
        },
        {
            "name": "webhooks",
            "description": "Status webhooks out to your endpoints, signed (Standard Webhooks); "
            "secret rotation and replay.",
        },
        {
            "name": "suppressions",
            "description": "Addresses that bounced, complained or replied STOP: nothing is sent "
            "to them until the suppression is lifted.",
        },
        {
            "name": "dead-letters",
            "description": "Deliveries that failed for good: list, count, replay or discard.",
        },
        {
            "name": "sandbox",
            "description": "What the sandbox providers would have sent (no provider account "
            "needed).",
        },
        {
            "name": "provider-hooks",
            "description": "Events in from SendGrid and Twilio (delivered, bounced, STOP), "
            "authenticated by the provider's signature, not an API key.",
        },
        {
            "name": "unsubscribe",
            "description": "An email's one-click unsubscribe link (RFC 8058): the page that "
            "asks to confirm, and the POST that unsubscribes.",
        },
    ],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "notifications.api.throttling.document_rate_limit",
        "notifications.api.schema.tag_by_resource",
        "notifications.api.schema.document_errors",
        "notifications.api.schema.require_answered_fields",
        "notifications.api.schema.share_parameter_enums",
    ],
}

# --- In-app (WebSocket and inbox) ----------------------------------------------------------
# Lifetime of a recipient token (WebSocket + inbox API): long enough for a page session,
# short enough that a leaked token soon stops opening new connections.
RECIPIENT_TOKEN_TTL_SECONDS = env.int("RECIPIENT_TOKEN_TTL_SECONDS", default=3600)
# A socket opened without ?token= must authenticate with its first frame within this; until
# then it holds a server connection without being anyone.
WS_AUTH_TIMEOUT_SECONDS = env.float("WS_AUTH_TIMEOUT_SECONDS", default=5.0)
# Client frames are tiny (auth, ack, read); anything larger is abuse or a bug.
WS_MAX_FRAME_BYTES = env.int("WS_MAX_FRAME_BYTES", default=4096)
# Per connection: a sustained rate and a burst of client frames. The burst lets a client ack
# a full backlog at once; past the rate the server stops reading that socket (backpressure),
# so one client cannot turn into more than this many database writes a second.
WS_CLIENT_FRAMES_PER_SECOND = env.float("WS_CLIENT_FRAMES_PER_SECOND", default=20.0)
WS_CLIENT_FRAMES_BURST = env.int("WS_CLIENT_FRAMES_BURST", default=200)
# Application-level heartbeat: a {"type": "ping"} this often, the browser's sign of life
# (clarion.js reconnects after 60 s of silence) and traffic under common proxy idle timeouts
# (60 s). No answer is awaited: uvicorn's protocol pings find clients that are gone. A ping
# that cannot be written within the timeout means the client stopped reading (closed, 4408).
WS_PING_INTERVAL_SECONDS = env.float("WS_PING_INTERVAL_SECONDS", default=25.0)
WS_PING_TIMEOUT_SECONDS = env.float("WS_PING_TIMEOUT_SECONDS", default=20.0)
# Most unread notifications replayed on connect (oldest first); the inbox API pages the rest.
WS_BACKLOG_MAX = env.int("WS_BACKLOG_MAX", default=1000)
# An in-app delivery due at accept is pushed by the process that committed it, not through
# the relay and a `web` worker (workers/web_push.py).
WEB_PUSH_AT_ACCEPT = env.bool("WEB_PUSH_AT_ACCEPT", default=True)
# Acks and reads of a server process's sockets are gathered this long and written together
# (channels_app/inbox_writer.py); at most this many wait (a database that refuses for long).
WS_ACK_WINDOW_SECONDS = env.float("WS_ACK_WINDOW_SECONDS", default=0.05)
WS_ACK_PENDING_MAX = env.int("WS_ACK_PENDING_MAX", default=100_000)
# Inbox positions remembered per connection above a gap not yet filled (frames that came
# early), to drop a frame already sent; past this many the gap is given up
# (channels_app/positions.py).
WS_SENT_IDS_MAX = env.int("WS_SENT_IDS_MAX", default=5000)
# The WebSocket server's garbage collector (channels_app/gc_freeze.py). Full collections that
# scan every open socket's objects made the latency tail (0.4 s at 2,000 sockets, 1.6 s at
# 10,000): every WS_GC_FREEZE_SECONDS the server moves what survived into the permanent
# generation (0 turns it off), and runs no full collection. That holds because a closed
# socket frees itself by reference counting: the reference cycles uvicorn and websockets left
# per connection are cut when it closes (gc_freeze.connection_cycles_break). Before that,
# make bench's soak grew ~37 KiB per closed socket without full collections. Should another
# cycle appear, full collections can be turned back on: at most WS_GC_FULL_COLLECT_SECONDS
# apart, or once WS_GC_FULL_COLLECT_GROWTH objects were frozen since the last (0: never).
WS_GC_FREEZE_SECONDS = env.float("WS_GC_FREEZE_SECONDS", default=5.0)
WS_GC_FULL_COLLECT_SECONDS = env.float("WS_GC_FULL_COLLECT_SECONDS", default=0.0)
WS_GC_FULL_COLLECT_GROWTH = env.int("WS_GC_FULL_COLLECT_GROWTH", default=0)
# A full collection that falls due by time is skipped while fewer objects than this were
# frozen since the last: an idle server makes no garbage to find, and each costs a pause.
WS_GC_FULL_COLLECT_MIN_GROWTH = env.int("WS_GC_FULL_COLLECT_MIN_GROWTH", default=1_000)
INBOX_PAGE_SIZE = env.int("INBOX_PAGE_SIZE", default=50)

# --- Delivery -------------------------------------------------------------------------------
RETRY_MAX_ATTEMPTS = env.int("RETRY_MAX_ATTEMPTS", default=3)
RETRY_BACKOFF_BASE_SECONDS = env.float("RETRY_BACKOFF_BASE_SECONDS", default=1.0)
# A worker holds a delivery this long while it talks to the provider; past it, the delivery
# is considered abandoned (worker killed) and the sweeper hands it out again.
DELIVERY_LEASE_SECONDS = env.int("DELIVERY_LEASE_SECONDS", default=120)
# A delivery queued longer than this without being taken is assumed lost by the broker.
SWEEPER_STALE_SECONDS = env.int("SWEEPER_STALE_SECONDS", default=300)
# On a Redis broker the sweeper can also see the messages consumers hold (workers/selectors.py,
# broker_held_delivery_ids): a delivery published this long ago, on a channel whose queue is
# empty, that no consumer holds (for less than DELIVERY_LEASE_SECONDS) and no worker leases,
# was lost between kombu's BRPOP and its bookkeeping (a connection that failed in between),
# and goes back to the outbox at once rather than after SWEEPER_STALE_SECONDS. Long enough
# that a message popped a moment ago has been recorded or claimed.
SWEEPER_LOST_SECONDS = env.int("SWEEPER_LOST_SECONDS", default=10)
SWEEPER_INTERVAL_SECONDS = env.float("SWEEPER_INTERVAL_SECONDS", default=30.0)
SWEEPER_BATCH_SIZE = env.int("SWEEPER_BATCH_SIZE", default=1000)
# Delivery ids per task: the relay publishes one task per chunk of this many deliveries of one
# channel, and a worker claims, sends and settles them together. 50 amortises the claim and the
# settle transaction (docs/benchmarks.md) while a batch stays well inside one lease.
DISPATCH_BATCH_SIZE = env.int("DISPATCH_BATCH_SIZE", default=50)
# The relay (workers/relay.py) wakes on a signal sent at commit (every writer sends one, also
# for a retry or deferral, which moves the next due time) and when the next row falls due;
# with no signal it still looks this often, which bounds the delay of a lost signal only. An
# idle relay's three queries a look are most of its idle cost.
RELAY_POLL_SECONDS = env.float("RELAY_POLL_SECONDS", default=5.0)
# The relay's /healthz (on WORKER_METRICS_PORT) answers 503 once its rounds have failed this
# long on end (database or broker unreachable): long enough to ride out a restart of either.
RELAY_UNHEALTHY_SECONDS = env.float("RELAY_UNHEALTHY_SECONDS", default=60.0)
# Rows one relay claims per round: one broker round trip publishes them all.
RELAY_CLAIM_SIZE = env.int("RELAY_CLAIM_SIZE", default=1000)
# Subscribers a topic fan-out turns into notifications per transaction (workers/fanout.py):
# large enough that the per-chunk claim, cursor update and commit are noise (at 500 they cost
# a third of the fan-out's time; docs/benchmarks.md), small enough that one transaction stays
# well under a second and a crash redoes little.
FANOUT_CHUNK_SIZE = env.int("FANOUT_CHUNK_SIZE", default=2000)
# Provider calls a worker makes at once for a batch on providers without a batch API (Twilio,
# FCM, SMTP): bounded so one worker process keeps a handful of pooled connections.
PROVIDER_CONCURRENCY = env.int("PROVIDER_CONCURRENCY", default=8)
# In-app frames of one batch the broadcaster sends at once: keeps a large batch inside the
# channel layer's Redis pool, which refuses a command when the pool is empty instead of waiting.
BROADCAST_CONCURRENCY = env.int("BROADCAST_CONCURRENCY", default=100)
# Redis redelivers an unacknowledged message after this. Nothing uses broker countdowns: waits
# live in the outbox (next_attempt_at) and the relay publishes a row when it falls due.
BROKER_VISIBILITY_TIMEOUT = env.int("BROKER_VISIBILITY_TIMEOUT", default=3600)
# The relay's publish retries before it gives up the round (its rows stay in the outbox and the
# next round, after a back-off, tries again).
BROKER_PUBLISH_MAX_RETRIES = env.int("BROKER_PUBLISH_MAX_RETRIES", default=2)

# The stall watchdog of each worker (workers/watchdog.py): its queue has held messages this
# long while the worker, with room for more, received none. It reconnects the consumer; if
# that does not help within the same time again, or the worker's event loop itself stopped
# turning, the process exits for its supervisor to start it again. 0 turns it off.
WORKER_STALL_SECONDS = env.float("WORKER_STALL_SECONDS", default=60.0)

CIRCUIT_FAILURE_THRESHOLD = env.int("CIRCUIT_FAILURE_THRESHOLD", default=5)
CIRCUIT_OPEN_SECONDS = env.int("CIRCUIT_OPEN_SECONDS", default=60)
CIRCUIT_SUCCESS_THRESHOLD = env.int("CIRCUIT_SUCCESS_THRESHOLD", default=3)
RATE_LIMITS = env.str("RATE_LIMITS", default="email=1000/m,sms=100/s,push=5000/s,web=10000/s")
# Tokens a bucket holds: how many sends may go at once after a quiet spell. 1 keeps the pace
# even, which is what providers that count per second want.
RATE_LIMIT_BURST = env.float("RATE_LIMIT_BURST", default=1.0)
# A worker waits in place for a token due within this; a longer wait puts the delivery back
# on its queue for later instead of holding the worker process.
RATE_LIMIT_MAX_SLEEP_SECONDS = env.float("RATE_LIMIT_MAX_SLEEP_SECONDS", default=1.0)

DELIVERY_LOG_BACKEND = env.str("DELIVERY_LOG_BACKEND", default="sql")
CASSANDRA_HOSTS = env.list("CASSANDRA_HOSTS", default=[])
CASSANDRA_KEYSPACE = env.str("CASSANDRA_KEYSPACE", default="clarion")
# A worker that cannot reach Cassandra should fail its task, not hang the queue.
CASSANDRA_CONNECT_TIMEOUT_SECONDS = env.float("CASSANDRA_CONNECT_TIMEOUT_SECONDS", default=5.0)
CASSANDRA_REQUEST_TIMEOUT_SECONDS = env.float("CASSANDRA_REQUEST_TIMEOUT_SECONDS", default=10.0)

# --- Providers ------------------------------------------------------------------------------
EMAIL_PROVIDER = env.str("EMAIL_PROVIDER", default="sandbox")
SMS_PROVIDER = env.str("SMS_PROVIDER", default="sandbox")
PUSH_PROVIDER = env.str("PUSH_PROVIDER", default="sandbox")
# Failover: an ordered list (EMAIL_PROVIDERS=sendgrid,smtp). While the first one's breaker is
# open, or after a transient failure, a delivery goes to the next. Empty: the single one above.
EMAIL_PROVIDERS = env.list("EMAIL_PROVIDERS", default=[])
SMS_PROVIDERS = env.list("SMS_PROVIDERS", default=[])
PUSH_PROVIDERS = env.list("PUSH_PROVIDERS", default=[])
# The in-app channel is delivered over WebSocket; `sandbox` only records.
WEB_PROVIDER = env.str("WEB_PROVIDER", default="websocket")

SMTP_HOST = env.str("SMTP_HOST", default="localhost")
SMTP_PORT = env.int("SMTP_PORT", default=25)
SMTP_USER = env.str("SMTP_USER", default="")
SMTP_PASSWORD = env.str("SMTP_PASSWORD", default="")
SMTP_USE_TLS = env.bool("SMTP_USE_TLS", default=False)
# Seconds for connect and each SMTP command; a stalled server is a transient failure.
SMTP_TIMEOUT_SECONDS = env.float("SMTP_TIMEOUT_SECONDS", default=10.0)
EMAIL_FROM = env.str("EMAIL_FROM", default="clarion@localhost")

# Vendor adapters. Credentials have no defaults; the *_BASE_URL settings let a local emulator
# or a proxy stand in for the vendor's API.
PROVIDER_TIMEOUT_SECONDS = env.float("PROVIDER_TIMEOUT_SECONDS", default=10.0)
SENDGRID_API_KEY = env.str("SENDGRID_API_KEY", default="")
SENDGRID_BASE_URL = env.str("SENDGRID_BASE_URL", default="https://api.sendgrid.com")
# Emails per SendGrid request: a worker that takes one queued email also takes up to this many
# more waiting ones into the same call. 1000 personalizations is SendGrid's own ceiling; 1
# turns batching off.
SENDGRID_MAX_BATCH = env.int("SENDGRID_MAX_BATCH", default=1000)
TWILIO_ACCOUNT_SID = env.str("TWILIO_ACCOUNT_SID", default="")
TWILIO_AUTH_TOKEN = env.str("TWILIO_AUTH_TOKEN", default="")
TWILIO_FROM_NUMBER = env.str("TWILIO_FROM_NUMBER", default="")
TWILIO_BASE_URL = env.str("TWILIO_BASE_URL", default="https://api.twilio.com")
FCM_SERVICE_ACCOUNT_FILE = env.str("FCM_SERVICE_ACCOUNT_FILE", default="")
FCM_PROJECT_ID = env.str("FCM_PROJECT_ID", default="")
FCM_BASE_URL = env.str("FCM_BASE_URL", default="https://fcm.googleapis.com")

# --- Provider events in (/hooks/sendgrid, /hooks/twilio) ------------------------------------
# SendGrid's Event Webhook verification key (Mail Settings → Signed Event Webhook, base64);
# without it /hooks/sendgrid refuses every post, as it cannot tell SendGrid's from a forgery.
SENDGRID_WEBHOOK_PUBLIC_KEY = env.str("SENDGRID_WEBHOOK_PUBLIC_KEY", default="")
# A signed post older (or newer) than this is refused as a replay: SendGrid signs each post
# as it sends it, retries included.
PROVIDER_HOOK_TOLERANCE_SECONDS = env.int("PROVIDER_HOOK_TOLERANCE_SECONDS", default=300)
# The address the world reaches Clarion at (https://notify.example.com): unsubscribe links in
# emails are made from it, and Twilio signs the URL it posted to, so the check needs it
# behind a proxy. Blank: http://localhost:$PORT in links, the request's own URL for Twilio.
PUBLIC_BASE_URL = env.str("PUBLIC_BASE_URL", default="").rstrip("/")
# Email of these template categories is mail a person asked for (a password reset, a
# receipt): it carries no List-Unsubscribe. Every other non-blank category does (RFC 8058).
TRANSACTIONAL_CATEGORIES = env.list("TRANSACTIONAL_CATEGORIES", default=["transactional"])
# Events applied per transaction by the maintenance worker.
PROVIDER_EVENTS_BATCH_SIZE = env.int("PROVIDER_EVENTS_BATCH_SIZE", default=500)
# An event about a delivery the worker has not settled yet (Twilio may call back before our
# own write commits) is tried again after this, and applied anyway after the wait.
PROVIDER_EVENTS_RETRY_SECONDS = env.float("PROVIDER_EVENTS_RETRY_SECONDS", default=5.0)
PROVIDER_EVENTS_WAIT_SECONDS = env.float("PROVIDER_EVENTS_WAIT_SECONDS", default=3600.0)
# The schedule's backstop: events whose apply task was lost, or that wait, are applied
# within this.
PROVIDER_EVENTS_INTERVAL_SECONDS = env.float("PROVIDER_EVENTS_INTERVAL_SECONDS", default=10.0)

# --- Status webhooks out (notifications/webhooks.py, workers/webhook_sender.py) -------------
# false: endpoints must be https:// and resolve to public addresses only, checked when
# registered and again at every send (no SSRF through DNS). true: http:// and private
# addresses too (tests, an internal network).
WEBHOOK_ALLOW_PRIVATE = env.bool("WEBHOOK_ALLOW_PRIVATE", default=False)
WEBHOOK_TIMEOUT_SECONDS = env.float("WEBHOOK_TIMEOUT_SECONDS", default=10.0)
# Calls at once per worker process, and messages claimed per round.
WEBHOOK_CONCURRENCY = env.int("WEBHOOK_CONCURRENCY", default=8)
WEBHOOK_BATCH_SIZE = env.int("WEBHOOK_BATCH_SIZE", default=100)
# A failing message retries with exponential backoff (RETRY_BACKOFF_BASE_SECONDS, doubling,
# at most the max delay) for this long, then is dead (replayable); a receiver down for hours
# still gets everything.
WEBHOOK_RETRY_FOR_SECONDS = env.int("WEBHOOK_RETRY_FOR_SECONDS", default=3 * 86400)
WEBHOOK_RETRY_MAX_DELAY_SECONDS = env.float("WEBHOOK_RETRY_MAX_DELAY_SECONDS", default=3600.0)
# An endpoint whose every call failed for this long is disabled (the admin says why).
WEBHOOK_DISABLE_AFTER_SECONDS = env.int("WEBHOOK_DISABLE_AFTER_SECONDS", default=5 * 86400)
# After a secret rotation the old secret signs too, for this long.
WEBHOOK_SECRET_ROLLOVER_SECONDS = env.int("WEBHOOK_SECRET_ROLLOVER_SECONDS", default=86400)
# The schedule's backstop: messages whose wake-up was lost are sent within this. A message is
# sent when its status change commits (a wake-up then), and a retry when it falls due (the
# sender asks for a wake at that time, workers/webhook_sender.py); a short sweep only makes an
# idle service busy (a task every 2 s was a quarter of its idle CPU).
WEBHOOK_SWEEP_SECONDS = env.float("WEBHOOK_SWEEP_SECONDS", default=30.0)

# --- Dead letters ---------------------------------------------------------------------------
# Dead letters per channel above this raise the alert (seed diagram 11: 10k).
DEAD_LETTER_ALERT_THRESHOLD = env.int("DEAD_LETTER_ALERT_THRESHOLD", default=10_000)

# --- Flower ---------------------------------------------------------------------------------
FLOWER_BASIC_AUTH = env.str("FLOWER_BASIC_AUTH", default="")

# --- Celery ---------------------------------------------------------------------------------
CHANNEL_QUEUES = ("email", "sms", "push", "web")
CELERY_QUEUES = (*CHANNEL_QUEUES, "maintenance", "webhooks")

# --- Static, i18n, logging ------------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# WhiteNoise serves the apps' static files straight from their folders (indexed once at
# start), so neither `make run` nor a deployment needs a collectstatic step.
WHITENOISE_USE_FINDERS = True
# STATIC_ROOT exists only after a collectstatic; without one, finders are the source.
warnings.filterwarnings("ignore", message="No directory at", category=UserWarning)
USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
USE_I18N = True

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
# json: one JSON object per line on stderr, for log shippers (the default everywhere);
# console: readable lines for a person at a terminal (`LOG_FORMAT=console make run`).
LOG_FORMAT = env.str("LOG_FORMAT", default="json")
if LOG_FORMAT not in ("json", "console"):
    raise ImproperlyConfigured(f"LOG_FORMAT={LOG_FORMAT!r}: use json or console")
# Django calls this with LOGGING in every process; Celery workers and beat too (setup_logging
# signal in project/celery.py), so Celery's own lines take the same format.
LOGGING_CONFIG = "core.logs.configure"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"clarion": {"()": "core.logs.formatter", "fmt": LOG_FORMAT}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "clarion",
            "stream": "ext://sys.stderr",
        }
    },
    "filters": {"per_socket_lines": {"()": "core.logs.PerSocketLinesAtDebug"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Django's defaults add a plain-text console handler under DEBUG; ours is the root's.
        "django": {"handlers": [], "level": LOG_LEVEL, "propagate": True},
        "django.db.backends": {"level": "INFO"},
        # uvicorn configures its own text handlers before Django loads; these replace them.
        "uvicorn": {"handlers": ["console"], "level": LOG_LEVEL, "propagate": False},
        "uvicorn.error": {
            "handlers": [],
            "level": LOG_LEVEL,
            "propagate": True,
            "filters": ["per_socket_lines"],
        },
        # The API logs every request itself, with request_id and client_ip.
        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": True},
        # The Twilio SDK logs every request at INFO.
        "twilio.http_client": {"level": "WARNING"},
    },
}

# --- Metrics --------------------------------------------------------------------------------
# Who may read /metrics: addresses or CIDR networks, comma-separated; empty lets anyone.
METRICS_ALLOWED_IPS = env.list("METRICS_ALLOWED_IPS", default=[])
# Seconds a scrape waits for the broker before leaving the queue depths out.
METRICS_SOURCE_TIMEOUT_SECONDS = env.float("METRICS_SOURCE_TIMEOUT_SECONDS", default=2.0)
# Set on hosts that run workers but no API server: the worker's main process serves that
# host's multiprocess directory on this port (0: off). Hosts with an API server leave it off,
# or the same counters would be scraped twice.
WORKER_METRICS_PORT = env.int("WORKER_METRICS_PORT", default=0)
WORKER_METRICS_ADDR = env.str("WORKER_METRICS_ADDR", default="0.0.0.0")  # noqa: S104 - opt-in

# --- API gateway ----------------------------------------------------------------------------
# Requests per second per API key when the key sets no rate_limit_per_second of its own; 0
# turns the limit off. A key's bucket holds this many seconds' worth, so a quiet client may
# send a burst of rate times burst requests at once.
API_RATE_LIMIT_PER_SECOND = env.int("API_RATE_LIMIT_PER_SECOND", default=100)
API_RATE_LIMIT_BURST_SECONDS = env.float("API_RATE_LIMIT_BURST_SECONDS", default=1.0)
# Reverse proxies in front of the API that append to X-Forwarded-For; the client address is
# taken that many entries from the right (0: REMOTE_ADDR, for a server reached directly).
NUM_PROXIES = env.int("NUM_PROXIES", default=0)
# Behind a TLS-terminating proxy that sets X-Forwarded-Proto (and strips a client's own).
TRUST_X_FORWARDED_PROTO = env.bool("TRUST_X_FORWARDED_PROTO", default=False)
if TRUST_X_FORWARDED_PROTO:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
