"""Email over SMTP, for self-hosters: one SMTP conversation per message with explicit
timeouts; the server's reply code decides transient or permanent."""

from __future__ import annotations

import re
import smtplib
from email.utils import make_msgid

from django.core.mail import EmailMultiAlternatives
from django.core.mail.backends.smtp import EmailBackend

from notifications.models import SuppressionReason
from workers.providers.base import OutboundMessage, Outcome, SendResult
from workers.retry import classify_smtp_code


class SmtpProvider:
    name = "smtp"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        use_tls: bool,
        timeout: float,
        from_email: str,
    ):
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.use_tls = use_tls
        self.timeout = timeout
        self.from_email = from_email

    def send(self, message: OutboundMessage) -> SendResult:
        domain = self.from_email.rpartition("@")[2] or "localhost"
        message_id = make_msgid(domain=domain)
        email = EmailMultiAlternatives(
            subject=message.content.get("subject", ""),
            body=message.content.get("body", ""),
            from_email=self.from_email,
            to=[str(message.to)],
            headers={
                "Message-ID": message_id,
                "X-Clarion-Notification-Id": message.notification_id,
                "X-Clarion-Delivery-Id": str(message.delivery_id),
                **message.headers,
            },
        )
        if message.content.get("html"):
            email.attach_alternative(message.content["html"], "text/html")
        connection = EmailBackend(
            host=self.host,
            port=self.port,
            username=self.username or None,
            password=self.password or None,
            use_tls=self.use_tls,
            timeout=self.timeout,
            fail_silently=False,
        )
        try:
            connection.send_messages([email])
        except smtplib.SMTPRecipientsRefused as exc:
            code, reply = next(iter(exc.recipients.values()))
            return SendResult(
                classify_smtp_code(code),
                status_code=code,
                error=_text(code, reply),
                suppress=SuppressionReason.BOUNCED if hard_bounce(code, reply) else "",
            )
        except smtplib.SMTPResponseException as exc:
            return SendResult(
                classify_smtp_code(exc.smtp_code),
                status_code=exc.smtp_code,
                error=_text(exc.smtp_code, exc.smtp_error),
            )
        except (smtplib.SMTPException, OSError) as exc:
            # Connection refused or reset, timeouts, a server that hung up: try again later.
            return SendResult(Outcome.TRANSIENT, error=f"{exc.__class__.__name__}: {exc}")
        return SendResult(Outcome.OK, provider_message_id=message_id.strip("<>"), status_code=250)


# RFC 3463 "5.1.x": the address itself is bad (no such mailbox, no such domain, bad syntax,
# null MX). Other 5xx refusals (policy, spam, size: 5.7.x, 5.3.x) say nothing of the address.
_BAD_ADDRESS = re.compile(r"^\s*5\.1\.\d{1,3}\b")


def hard_bounce(code: int, reply: bytes | str) -> bool:
    """A refusal of the recipient that means the address does not exist."""
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return 500 <= code < 600 and bool(_BAD_ADDRESS.match(reply))


def _text(code: int, reply: bytes | str) -> str:
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return f"SMTP {code}: {reply}"
