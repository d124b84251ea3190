"""Grid gateway settings. Every value comes from a GRID_* environment variable.

The defaults work on a developer machine with PostgreSQL and Redis on their
standard local ports; the README lists every variable.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

from gridproto.logformat import formatter_class
from gridsite.env import env_bool, env_float, env_int, env_list, env_rate, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("GRID_DEBUG", False)
# The default key is public: `manage.py check --deploy` flags it, so set
# GRID_SECRET_KEY (or GRID_SECRET_KEY_FILE) anywhere but a laptop.
SECRET_KEY = env_str("GRID_SECRET_KEY", "django-insecure-grid-development-key")
ALLOWED_HOSTS = env_list("GRID_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("GRID_CSRF_TRUSTED_ORIGINS", "")

# GRID_HTTPS=1 declares that clients reach the gateway only over TLS, usually
# terminated by a reverse proxy. HTTP is then redirected, cookies go only over
# TLS, and HSTS makes browsers keep to HTTPS. docs/deployment.md has a proxy
# configuration.
HTTPS = env_bool("GRID_HTTPS", False)
SECURE_SSL_REDIRECT = env_bool("GRID_SECURE_SSL_REDIRECT", HTTPS)
# Load balancers probe over plain HTTP inside the private network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SESSION_COOKIE_SECURE = env_bool("GRID_SECURE_COOKIES", HTTPS)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = env_int("GRID_SECURE_HSTS_SECONDS", 31536000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("GRID_SECURE_HSTS_INCLUDE_SUBDOMAINS", HTTPS)
# Preloading is hard to undo (browsers ship the list), so it is asked for separately.
SECURE_HSTS_PRELOAD = env_bool("GRID_SECURE_HSTS_PRELOAD", False)
# Behind a proxy that terminates TLS, trust its X-Forwarded-Proto header. Set
# this only when the proxy overwrites the header sent by clients.
if env_bool("GRID_SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "apps.accounts",
    "apps.registry",
    "apps.inference",
    "apps.dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "gridsite.middleware.RejectNulCharacters",
    "gridsite.static.AsyncWhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # A view that cannot reach PostgreSQL or Redis answers 503 naming which.
    "gridsite.outage.ServiceOutage",
]

ROOT_URLCONF = "gridsite.urls"
ASGI_APPLICATION = "gridsite.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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

DATABASES = {
    "default": dj_database_url.parse(
        env_str("GRID_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/grid"),
    )
}
# Under ASGI each request may run on a new thread; without a pool every ORM
# call there opens a new PostgreSQL connection (measured at +3.4 ms).
if env_bool("GRID_DB_POOL", True):
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env_int("GRID_DB_POOL_SIZE", 10),
        "timeout": 10,
    }

REDIS_URL = env_str("GRID_REDIS_URL", "redis://127.0.0.1:6379/0")

# The pub/sub layer costs about 0.3 ms a send against about 1 ms for the
# list-based default layer. A send to a channel nobody listens on is lost, so
# dispatch publishes directly and checks the receiver count (apps.inference.delivery).
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": env_str("GRID_CHANNEL_PREFIX", "grid")},
    }
}

CELERY_BROKER_URL = env_str("GRID_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Deployments that share a Redis server must not take each other's tasks, so
# the queue is named after the deployment's key prefix.
CELERY_TASK_DEFAULT_QUEUE = CHANNEL_LAYERS["default"]["CONFIG"]["prefix"]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# WhiteNoise (gridsite.static) serves STATIC_ROOT, filled by `manage.py
# collectstatic`, and falls back to the apps' static folders, so a gateway
# started without collectstatic (`grid up`) still serves the admin's files. No
# manifest, for the same reason.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.accounts.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": [
        "rest_framework.permissions.IsAuthenticated",
        # API tokens carry scopes: read, serve, infer, admin.
        "apps.accounts.permissions.TokenScope",
    ],
    "DEFAULT_THROTTLE_CLASSES": ["apps.accounts.throttling.TokenRateThrottle"],
    "DEFAULT_PARSER_CLASSES": [
        "gridsite.parsers.BoundedJSONParser",
        "gridsite.parsers.BoundedFormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "EXCEPTION_HANDLER": "gridsite.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Grid gateway API",
    # gridsite.schema.add_plain_views replaces this with the full description.
    "DESCRIPTION": "Serve models on node agents and run remote inference through one gateway.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "NodeStatusEnum": "apps.registry.models.Node.Status",
        "PlacementStatusEnum": "apps.inference.models.Placement.Status",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "gridsite.schema.add_plain_views",
    ],
}

# Grid's own settings.
GRID = {
    # Seconds between agent heartbeats; a node with none for
    # HEARTBEAT_MISSES intervals is marked offline.
    "HEARTBEAT_INTERVAL": env_float("GRID_HEARTBEAT_INTERVAL", 2.0),
    "HEARTBEAT_MISSES": env_int("GRID_HEARTBEAT_MISSES", 3),
    # Seconds a synchronous inference request waits by default, and at most.
    "INFER_TIMEOUT": env_float("GRID_INFER_TIMEOUT", 30.0),
    "INFER_TIMEOUT_MAX": env_float("GRID_INFER_TIMEOUT_MAX", 300.0),
    # Seconds one attempt on one node may take before the job fails over.
    "ATTEMPT_TIMEOUT": env_float("GRID_ATTEMPT_TIMEOUT", 10.0),
    "MAX_ATTEMPTS": env_int("GRID_MAX_ATTEMPTS", 4),
    "MAX_UPLOAD_BYTES": env_int("GRID_MAX_UPLOAD_BYTES", 2 * 1024**3),
    "MAX_INFER_BYTES": env_int("GRID_MAX_INFER_BYTES", 32 * 1024**2),
    "WS_MAX_BYTES": env_int("GRID_WS_MAX_BYTES", 64 * 1024**2),
    "MODEL_CHUNK_BYTES": env_int("GRID_MODEL_CHUNK_BYTES", 1024**2),
    # Uploads wait here only until their placement ends, then are deleted.
    "STAGING_DIR": Path(env_str("GRID_STAGING_DIR", str(BASE_DIR / "var" / "staging"))),
    # Seconds a placement may stay pending or transferring before it fails.
    "PLACEMENT_TIMEOUT": env_float("GRID_PLACEMENT_TIMEOUT", 300.0),
    # Seconds a node holding a replica may stay offline before the replica is
    # re-created on another node; a short blip causes no churn.
    "REPLICA_GRACE": env_float("GRID_REPLICA_GRACE", 30.0),
    # Seconds a finished result stays readable in Redis when nobody waited
    # for it, and after it was delivered (for a retry with an Idempotency-Key).
    "RESULT_TTL": env_int("GRID_RESULT_TTL", 300),
    "DELIVERED_RESULT_TTL": env_int("GRID_DELIVERED_RESULT_TTL", 30),
    # A node takes up to concurrency x NODE_QUEUE_FACTOR jobs at once; the
    # extra slots queue on the agent, where they can be batched.
    "NODE_QUEUE_FACTOR": env_int("GRID_NODE_QUEUE_FACTOR", 4),
    # When every replica is full, up to QUEUE_MAX requests per gateway process
    # wait up to QUEUE_WAIT seconds for room, then get 429 with Retry-After.
    "QUEUE_MAX": env_int("GRID_QUEUE_MAX", 256),
    "QUEUE_WAIT": env_float("GRID_QUEUE_WAIT", 2.0),
    # Relative and absolute tolerance when verify=2 compares two replicas' outputs.
    "VERIFY_RTOL": env_float("GRID_VERIFY_RTOL", 1e-4),
    "VERIFY_ATOL": env_float("GRID_VERIFY_ATOL", 1e-5),
    # Seconds an Idempotency-Key maps to its job.
    "IDEMPOTENCY_TTL": env_int("GRID_IDEMPOTENCY_TTL", 86400),
    # Seconds a gateway process given SIGTERM spends handing its agents to
    # other gateway processes before it closes what is left (gridsite.lifespan).
    "SHUTDOWN_DRAIN": env_float("GRID_SHUTDOWN_DRAIN", 10.0),
    # When set, GET /metrics requires "Authorization: Bearer <this value>".
    "METRICS_TOKEN": env_str("GRID_METRICS_TOKEN", ""),
    # Requests per API token, as (count, window seconds), or None for no
    # limit: REST calls, and inference calls, which clients send in bulk.
    "THROTTLE_RATE": env_rate("GRID_THROTTLE_RATE", "600/min"),
    "INFER_THROTTLE_RATE": env_rate("GRID_INFER_THROTTLE_RATE", "6000/min"),
}

# Files the multipart parser keeps in memory before spilling to disk: uploads
# stream to disk, never whole in memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024**2
DATA_UPLOAD_MAX_MEMORY_SIZE = GRID["MAX_INFER_BYTES"] + 1024**2
FILE_UPLOAD_TEMP_DIR = None

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # GRID_LOG_FORMAT=json writes one JSON object per line (gridproto.logformat).
    "formatters": {"grid": {"()": formatter_class(os.environ)}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "grid"}},
    "root": {"handlers": ["console"], "level": env_str("GRID_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
    },
}
