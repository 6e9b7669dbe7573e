"""One logging setup for every Clarion process (API and WebSocket server, Celery workers, beat):
one JSON object per line on stderr with timestamp, level, logger, event and the bound context
(request_id, notification_id, delivery_id, ...), with secrets redacted; LOG_FORMAT=console
renders the same events as readable lines instead."""

from __future__ import annotations

import functools
import logging
import logging.config
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

import structlog
from structlog.typing import EventDict, Processor

REDACTED = "[redacted]"

# Keys whose value is a credential whatever it looks like (compared lowercased, "-" as "_").
SENSITIVE_KEYS = frozenset(
    {
        "authorization",
        "http_authorization",
        "proxy_authorization",
        "cookie",
        "http_cookie",
        "set_cookie",
        "password",
        "passwd",
        "secret",
        "secret_key",
        "api_key",
        "apikey",
        "x_api_key",
        "raw_key",
        "token",
        "access_token",
        "auth_token",
        "recipient_token",
        "smtp_password",
        "sendgrid_api_key",
        "twilio_auth_token",
        "flower_basic_auth",
    }
)

# Credentials inside free text: log messages, exception text, reprs.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Clarion API keys (services.API_KEY_PREFIX + token_urlsafe).
    (re.compile(r"(?<![A-Za-z0-9])clr_[A-Za-z0-9_\-]{8,}"), "clr_" + REDACTED),
    # Authorization header values quoted in text.
    (re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s\"',;]+"), r"\1\2" + REDACTED),
    # Credentials in query strings (the WebSocket's ?token=, a client's ?api_key=).
    (
        re.compile(r"(?i)([?&;](?:token|access_token|api_key|key|password|secret)=)[^&\s\"'#]+"),
        r"\1" + REDACTED,
    ),
    # user:password@ in URLs (database, Redis, broker).
    (re.compile(r"(?i)([a-z][a-z0-9+.\-]*://[^:/\s@]*:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
    # django.core.signing values (payload:timestamp:signature): recipient tokens.
    (re.compile(r"(?<![\w-])[\w-]{10,}:[0-9A-Za-z]{4,10}:[\w-]{43}(?![\w-])"), REDACTED),
)

# Cheap first look: text with none of these cannot match a pattern above (most log text).
_TRIGGER = re.compile(
    r"clr_|bearer|basic|[?&;](?:token|access_token|api_key|key|password|secret)=|://"
    r"|:[0-9A-Za-z]{4,10}:",
    re.IGNORECASE,
)

# A configured secret shorter than this is not searched for in text: it would match words.
_MIN_SECRET_LENGTH = 6


class Redactor:
    """A structlog processor that replaces credentials in the event dict, recursively: the
    values of sensitive keys, known secret values (from settings), and credential-shaped text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: tuple[str, ...] = ()
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        wanted = {s for s in secrets if s and len(s) >= _MIN_SECRET_LENGTH}
        self.secrets = tuple(sorted(wanted, key=len, reverse=True))

    def __call__(self, logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        return {key: self._value(key, value) for key, value in event_dict.items()}

    def _value(self, key: Any, value: Any) -> Any:
        if isinstance(key, str) and key.lower().replace("-", "_") in SENSITIVE_KEYS:
            return REDACTED if value not in (None, "") else value
        return self._redact(value)

    def _redact(self, value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {k: self._value(k, v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._redact(v) for v in value]
        # Anything else is rendered as text here, so credentials in a repr are caught too.
        text = value if isinstance(value, str) else repr(value)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if _TRIGGER.search(text):
            for pattern, replacement in _PATTERNS:
                text = pattern.sub(replacement, text)
        return text


redactor = Redactor()


def _drop_color_message(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    # uvicorn passes an ANSI-coloured copy of its message as an extra.
    event_dict.pop("color_message", None)
    return event_dict


_LEADING_KEYS = ("timestamp", "level", "logger", "event")


def _leading_keys_first(logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
    # The same four keys open every line, whatever the call bound, so lines read alike.
    ordered = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    return {**ordered, **event_dict}


# Applied to records from the standard library (Django, Celery, uvicorn, our logging calls):
# the bound context, then `extra={...}` fields (an explicit extra wins over the context).
_FOREIGN_PRE_CHAIN: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.ExtraAdder(),
    _drop_color_message,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
]


def formatter(fmt: str = "json") -> logging.Formatter:
    """The logging.Formatter of every handler (referenced from settings.LOGGING)."""
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_FOREIGN_PRE_CHAIN,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Tracebacks become text before redaction: exception messages carry secrets too.
            structlog.processors.format_exc_info,
            redactor,
            _leading_keys_first,
            renderer,
        ],
    )


def configured_secrets() -> list[str]:
    from django.conf import settings

    values = [
        getattr(settings, name, "")
        for name in (
            "SECRET_KEY",
            "SMTP_PASSWORD",
            "SENDGRID_API_KEY",
            "TWILIO_AUTH_TOKEN",
            "FLOWER_BASIC_AUTH",
        )
    ]
    values += [db.get("PASSWORD", "") for db in getattr(settings, "DATABASES", {}).values()]
    return [str(v) for v in values if v]


# What uvicorn and the websockets library write at INFO for every WebSocket opened or refused
# and closed: three lines a socket, tens of thousands when a fleet of clients reconnects.
_PER_SOCKET_MESSAGES = frozenset(
    {
        '%s - "WebSocket %s" [accepted]',
        '%s - "WebSocket %s" 403',
        "connection open",
        "connection closed",
    }
)


class PerSocketLinesAtDebug(logging.Filter):
    """On uvicorn.error: the per-socket lines above become DEBUG lines, written only when the
    logger is at DEBUG (LOG_LEVEL=DEBUG); the server's other lines are untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or record.msg not in _PER_SOCKET_MESSAGES:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def configure(config: dict[str, Any]) -> None:
    """settings.LOGGING_CONFIG: Django calls it with settings.LOGGING in every process (the
    Celery worker through its setup_logging signal too)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    redactor.set_secrets(configured_secrets())
    logging.config.dictConfig(config)
    # Warnings become log records, so they are JSON lines too.
    logging.captureWarnings(True)


P = ParamSpec("P")
R = TypeVar("R")


def scoped_log_context(func: Callable[P, R]) -> Callable[P, R]:
    """Whatever the function binds to the log context (structlog.contextvars) is unbound when
    it returns, so a notification's or a delivery's ids never tag the caller's next lines."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        saved = structlog.contextvars.get_contextvars()
        try:
            return func(*args, **kwargs)
        finally:
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(**saved)

    return wrapper


# An incoming X-Request-ID is kept when it looks like an id, not like an injection.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")


def sane_request_id(value: str | None) -> str | None:
    return value if value and _REQUEST_ID.match(value) else None
