"""Provider registry: which adapters serve each channel, in order, chosen by EMAIL_PROVIDERS,
SMS_PROVIDERS and PUSH_PROVIDERS (an ordered list: the first is the primary, the others take
over while it fails) or the single EMAIL_PROVIDER, SMS_PROVIDER, PUSH_PROVIDER and
WEB_PROVIDER. A provider selected without its settings refuses to start and names what is
missing."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from workers.providers.base import BatchProvider, OutboundMessage, Outcome, Provider, SendResult

__all__ = [
    "BatchProvider",
    "OutboundMessage",
    "Outcome",
    "Provider",
    "SendResult",
    "check",
    "provider_for",
    "providers_for",
]

CHANNEL_SETTING = {
    "email": "EMAIL_PROVIDER",
    "sms": "SMS_PROVIDER",
    "push": "PUSH_PROVIDER",
    "web": "WEB_PROVIDER",
}


def _require(*names: str) -> None:
    missing = [name for name in names if not getattr(settings, name, "")]
    if missing:
        raise ImproperlyConfigured(f"{' and '.join(missing)} must be set for the selected provider")


def _sandbox() -> Provider:
    from workers.providers.sandbox import SandboxProvider

    return SandboxProvider()


def _smtp() -> Provider:
    from workers.providers.smtp import SmtpProvider

    _require("SMTP_HOST", "SMTP_PORT", "EMAIL_FROM")
    if settings.SMTP_USER and not settings.SMTP_PASSWORD:
        _require("SMTP_PASSWORD")
    return SmtpProvider(
        host=settings.SMTP_HOST,
        port=settings.SMTP_PORT,
        username=settings.SMTP_USER,
        password=settings.SMTP_PASSWORD,
        use_tls=settings.SMTP_USE_TLS,
        timeout=settings.SMTP_TIMEOUT_SECONDS,
        from_email=settings.EMAIL_FROM,
    )


def _sendgrid() -> Provider:
    from workers.providers.sendgrid import SendGridProvider

    _require("SENDGRID_API_KEY", "EMAIL_FROM")
    return SendGridProvider(
        api_key=settings.SENDGRID_API_KEY,
        base_url=settings.SENDGRID_BASE_URL,
        from_email=settings.EMAIL_FROM,
        timeout=settings.PROVIDER_TIMEOUT_SECONDS,
        max_batch=settings.SENDGRID_MAX_BATCH,
    )


def _twilio() -> Provider:
    from workers.providers.twilio import TwilioProvider

    _require("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_FROM_NUMBER")
    return TwilioProvider(
        account_sid=settings.TWILIO_ACCOUNT_SID,
        auth_token=settings.TWILIO_AUTH_TOKEN,
        from_number=settings.TWILIO_FROM_NUMBER,
        base_url=settings.TWILIO_BASE_URL,
        timeout=settings.PROVIDER_TIMEOUT_SECONDS,
    )


def _fcm() -> Provider:
    from workers.providers.fcm import FcmProvider

    _require("FCM_SERVICE_ACCOUNT_FILE", "FCM_PROJECT_ID")
    return FcmProvider(
        service_account_file=settings.FCM_SERVICE_ACCOUNT_FILE,
        project_id=settings.FCM_PROJECT_ID,
        base_url=settings.FCM_BASE_URL,
        timeout=settings.PROVIDER_TIMEOUT_SECONDS,
    )


def _websocket() -> Provider:
    from workers.providers.web import WebSocketProvider

    return WebSocketProvider(timeout=settings.PROVIDER_TIMEOUT_SECONDS)


# channel -> provider name -> factory.
FACTORIES: dict[str, dict[str, Callable[[], Provider]]] = {
    "email": {"sandbox": _sandbox, "smtp": _smtp, "sendgrid": _sendgrid},
    "sms": {"sandbox": _sandbox, "twilio": _twilio},
    "push": {"sandbox": _sandbox, "fcm": _fcm},
    "web": {"sandbox": _sandbox, "websocket": _websocket},
}


@cache
def providers_for(channel: str) -> tuple[Provider, ...]:
    """The channel's providers in failover order: `<CHANNEL>_PROVIDERS` when set, else the
    single `<CHANNEL>_PROVIDER`."""
    single = CHANNEL_SETTING[channel]
    setting = f"{single}S"
    names = [n.strip() for n in getattr(settings, setting, None) or [] if n.strip()]
    if not names:
        setting, names = single, [getattr(settings, single)]
    if len(set(names)) != len(names):
        raise ImproperlyConfigured(f"{setting} names a provider twice: {','.join(names)}")
    built = []
    for name in names:
        factory = FACTORIES[channel].get(name)
        if factory is None:
            choices = ", ".join(sorted(FACTORIES[channel]))
            raise ImproperlyConfigured(
                f"{setting}={','.join(names)!r}: {name!r} is not a provider; use one of {choices}"
            )
        built.append(factory())
    return tuple(built)


class _Primary:
    """provider_for(channel): the channel's primary provider; cache_clear() forgets every
    provider built (a test that changes the settings calls it)."""

    def __call__(self, channel: str) -> Provider:
        return providers_for(channel)[0]

    def cache_clear(self) -> None:
        providers_for.cache_clear()


provider_for = _Primary()


def check() -> None:
    """Build every selected provider once, so a missing setting stops the process at start."""
    providers_for.cache_clear()
    for channel in CHANNEL_SETTING:
        providers_for(channel)
