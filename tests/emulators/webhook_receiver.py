"""A status-webhook receiver: an endpoint that answers 200 to every POST (unless told to fail,
or stopped) and checks what it got with the Standard Webhooks reference implementation."""

from __future__ import annotations

from collections import Counter
from typing import Any

from standardwebhooks.webhooks import Webhook as Verifier

from tests.emulators.base import Emulator, Request, Response


class WebhookReceiver(Emulator):
    name = "webhook-receiver"

    def answer(self, request: Request) -> Response:
        return Response(200, {"ok": True})

    def verified(self, secret: str) -> list[dict[str, Any]]:
        """Every message answered 200, checked with the reference implementation (raises on
        a bad signature), with its `webhook-id` as "id"."""
        verifier = Verifier(secret)
        out = []
        for request in self.accepted_requests():
            headers = {k: v for k, v in request.headers.items() if k.startswith("webhook-")}
            out.append({"id": headers["webhook-id"], **verifier.verify(request.body, headers)})
        return out

    def ids(self) -> Counter[str]:
        """How many times each `webhook-id` was answered 200."""
        return Counter(r.headers.get("webhook-id", "") for r in self.accepted_requests())
