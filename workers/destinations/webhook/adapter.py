"""A company's own service behind a Standard Webhooks endpoint: one signed POST per user.

The rules (``shared/reference/destinations.md``, "Internal services"):

- One message per user per request, signed with every configured secret over
  the exact bytes sent; ``webhook-id`` is stable across retries of a delivery,
  so the receiver can drop a message it already has.
- The batch's messages go out concurrently over one keep-alive session, each
  under the shared rate limit; none starts after the batch deadline, and each
  ends within connect + timeout, answer included. Redirects are not followed.
- 2xx is success. 401, 403, 3xx and 410 pause the destination (the secret, the
  URL or the receiver needs a human; 410 means the receiver asked to stop).
  408, 429, 5xx, timeouts and lost connections are retried, honouring
  ``Retry-After``; a 429 does not spend the attempt budget. Any other 4xx fails
  the delivery with the receiver's answer.
- A user whose message would say what was last sent is not sent again, unless
  an operator resyncs it or a message whose answer never came may still land.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from idsync.logs import register_secrets, scrub
from workers.destinations.base import (
    CallSummary,
    ContactClaim,
    Headroom,
    Intent,
    Limiter,
    LimiterTimeout,
    Outcome,
    Verdict,
)
from workers.destinations.webhook.http import Answer, post
from workers.destinations.webhook.payload import PING, Message, build_message, encode, rfc3339
from workers.destinations.webhook.settings import SECRET_PREFIX, Config, WebhookSettings
from workers.destinations.webhook.signing import signature_header

if TYPE_CHECKING:
    from idsync.settings import Settings

# Requests in flight at once for one batch: enough to hide a receiver's latency,
# few enough not to flood it.
PARALLEL_REQUESTS = 8
# A worker holding claims waits at most this long for a request slot, so that no
# claim's lease expires while it waits.
LIMITER_WAIT_SECONDS = 20.0
EXCERPT_LIMIT = 500
# A 429 without Retry-After waits at least this long (else one window of our own limit).
MIN_THROTTLE_SECONDS = 1.0


@dataclass
class _Batch:
    """What the concurrent sends of one ``deliver`` share: its deadline and whether to stop."""

    deadline: float
    halted: Outcome | None = None  # the answer every send not yet started gets instead
    lock: threading.Lock = field(default_factory=threading.Lock)

    def halt(self, outcome: Outcome) -> None:
        with self.lock:
            if self.halted is None:
                self.halted = replace(outcome, calls=[], uncertain=False, email=None)

    def stopped(self) -> Outcome | None:
        with self.lock:
            return replace(self.halted, calls=[]) if self.halted else None


def build(
    config: Config,
    settings: Settings,
    limiter: Limiter,
    on_headroom: Callable[[Headroom], None] | None = None,
) -> WebhookDestination:
    """The adapter of one webhook destination (the registry's entry point).

    A receiver reports no rate-limit headroom, so ``on_headroom`` is never called.
    WebhookSettingsError when the destination lacks its URL or secret.
    """
    limiter_wait = min(LIMITER_WAIT_SECONDS, settings.lease_seconds / 4)
    return WebhookDestination(
        config.name, config.webhook_settings(), limiter, limiter_wait=limiter_wait
    )


class WebhookDestination:
    """Sends each user's newest state as one signed Standard Webhooks message."""

    # An absent mapped field is sent as JSON null: there is no other "cleared" value.
    clears_with: str | None = None

    def __init__(
        self,
        name: str,
        settings: WebhookSettings,
        limiter: Limiter,
        *,
        limiter_wait: float = LIMITER_WAIT_SECONDS,
        parallel_requests: int = PARALLEL_REQUESTS,
    ) -> None:
        self.name = name
        self.settings = settings
        self.limiter = limiter
        self.limiter_wait = limiter_wait
        self.batch_size = settings.batch_size
        self.mapping = settings.mapping()
        self._variable = name.upper()
        self._keys = settings.signing_keys
        self._path = urlsplit(settings.url).path or "/"
        self._secrets = [
            text
            for secret in settings.secrets
            for text in (secret, secret.removeprefix(SECRET_PREFIX))
        ]
        register_secrets(self._secrets)
        self._session = requests.Session()
        pooled = HTTPAdapter(pool_connections=1, pool_maxsize=parallel_requests, max_retries=0)
        self._session.mount("https://", pooled)
        self._session.mount("http://", pooled)
        self._session.headers.update({"User-Agent": "idsync", "Content-Type": "application/json"})
        self._pool = ThreadPoolExecutor(
            max_workers=parallel_requests, thread_name_prefix=f"webhook-{name}"
        )

    def __repr__(self) -> str:
        return f"WebhookDestination(name={self.name!r}, path={self._path!r})"

    def close(self) -> None:
        """Stop the senders and close the pooled connections."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._session.close()

    def deliver(
        self, intents: list[Intent], *, claim: ContactClaim, deadline: float
    ) -> dict[str, Outcome]:
        """Send each changed user's message, concurrently, starting none after ``deadline``."""
        outcomes: dict[str, Outcome] = {}
        batch = _Batch(deadline)
        sends: dict[str, Future[Outcome]] = {}
        for intent in intents:
            try:
                message = build_message(intent, self.mapping)
            except ValueError as error:
                outcomes[intent.key] = Outcome(
                    Verdict.FAILED, reason="unencodable", message=scrub(str(error))[:1000]
                )
                continue
            if self._unchanged(intent, message):
                outcomes[intent.key] = self._success(intent, message, reason="unchanged")
                continue
            sends[intent.key] = self._pool.submit(self._send, intent, message, batch)
        for key, send in sends.items():
            try:
                outcomes[key] = send.result()
            except Exception as error:  # one send's bug must not lose the others' outcomes
                outcomes[key] = Outcome(
                    Verdict.RETRY,
                    reason="unexpected_error",
                    message=scrub(f"{type(error).__name__}: {error}")[:1000],
                )
        return outcomes

    def read(self, external_ids: list[str]) -> dict[str, dict[str, Any]] | None:
        """None: a receiver cannot be read back; what idsync sent is all it knows."""
        return None

    def probe(self) -> str | None:
        """None when the endpoint accepts a signed ``idsync.ping``, else why not."""
        body = encode({"type": PING, "timestamp": rfc3339(datetime.now(UTC)), "data": {}})
        try:
            self.limiter.acquire(self.limiter_wait)
        except LimiterTimeout as error:
            return f"no request slot: {error}"
        answer = self._post(f"msg_ping_{uuid.uuid4().hex}", body)
        refusal = self._refusal(answer)
        return None if refusal is None else refusal.message

    # Sending

    @staticmethod
    def _unchanged(intent: Intent, message: Message) -> bool:
        """Whether the receiver has this message's content already.

        Not while an earlier message with another content may still land (its
        answer never came): then the receiver could end up holding that one.
        """
        link = intent.link
        same = message.properties_hash == link.properties_hash
        return same and not intent.force and not link.uncertain

    def _send(self, intent: Intent, message: Message, batch: _Batch) -> Outcome:
        """One user's message under the rate limit, unless the batch is over or stopped."""
        stopped = batch.stopped()
        if stopped is not None:
            return stopped
        left = batch.deadline - time.monotonic()
        if left <= 0:
            return _batch_deadline()
        try:
            self.limiter.acquire(min(self.limiter_wait, left))
        except LimiterTimeout as error:
            return Outcome(
                Verdict.RETRY,
                reason="limiter_busy",
                message=str(error),
                counts_against_budget=False,
                retry_after=5.0,
            )
        if time.monotonic() >= batch.deadline:
            return _batch_deadline()
        stopped = batch.stopped()
        if stopped is not None:
            return stopped
        answer = self._post(message.id, message.body)
        summary = self._summary(message.id, answer)
        refusal = self._refusal(answer)
        if refusal is None:
            outcome = self._success(intent, message)
        else:
            outcome = refusal
            outcome.email = intent.user.email
            self._spread(refusal, answer, batch)
        outcome.calls = [summary]
        return outcome

    def _post(self, message_id: str, body: bytes) -> Answer:
        """POST one signed message; the timestamp is the moment of sending."""
        timestamp = int(time.time())
        headers = {
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(self._keys, message_id, timestamp, body),
        }
        return post(
            self._session,
            self.settings.url,
            body,
            headers,
            connect_timeout=self.settings.connect_timeout_seconds,
            timeout=self.settings.timeout_seconds,
        )

    def _spread(self, refusal: Outcome, answer: Answer, batch: _Batch) -> None:
        """A pause or a throttle concerns the whole endpoint: the sends not yet started wait."""
        if refusal.verdict is Verdict.PAUSE:
            batch.halt(refusal)
        elif refusal.reason == "rate_limited" or (
            refusal.verdict is Verdict.RETRY and answer.retry_after is not None
        ):
            wait = refusal.retry_after or 0.0
            self.limiter.block_for(wait)
            batch.halt(replace(refusal, reason="throttled", counts_against_budget=False))

    # Answers

    def _refusal(self, answer: Answer) -> Outcome | None:
        """None for a 2xx; otherwise the outcome the answer means for the delivery."""
        status, variable = answer.status, self._variable
        if status is None:
            return Outcome(
                Verdict.RETRY,
                reason="timeout" if answer.error_category == "TIMEOUT" else "connection_error",
                message=f"no answer from the receiver ({answer.error_category})",
                uncertain=answer.maybe_delivered,
            )
        if 200 <= status < 300:
            return None
        excerpt = self._excerpt(answer.text)
        if 300 <= status < 400:
            location = scrub(answer.location or "no Location")[:EXCERPT_LIMIT]
            return _pause(
                "redirected",
                f"the endpoint redirects (HTTP {status}) to {location}; idsync does not "
                f"follow redirects: set {variable}_URL to the new address",
                status,
            )
        if status in (401, 403):
            return _pause(
                "signature_refused",
                f"the receiver refused the message (HTTP {status}); check that "
                f"{variable}_SECRET holds its secret: {excerpt}",
                status,
            )
        if status == 410:
            gone = _pause(
                "endpoint_gone",
                f"endpoint gone (HTTP 410): the receiver at {variable}_URL asked idsync to "
                "stop sending; fix the receiver or the URL, then resume the destination by hand",
                status,
            )
            return replace(gone, resume_by_hand=True)
        if status == 429:
            return Outcome(
                Verdict.RETRY,
                reason="rate_limited",
                message=f"the receiver is rate limiting (HTTP 429): {excerpt}",
                status_code=status,
                counts_against_budget=False,
                retry_after=self._throttle_wait(answer.retry_after),
            )
        if status == 408 or status >= 500:
            return Outcome(
                Verdict.RETRY,
                reason="server_error" if status >= 500 else "receiver_timeout",
                message=f"the receiver answered HTTP {status}: {excerpt}",
                status_code=status,
                retry_after=answer.retry_after,
            )
        return Outcome(
            Verdict.FAILED,
            reason="rejected",
            message=f"the receiver refused the message (HTTP {status}): {excerpt}",
            status_code=status,
        )

    def _throttle_wait(self, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return max(MIN_THROTTLE_SECONDS, self.settings.rate[1])

    def _success(self, intent: Intent, message: Message, *, reason: str | None = None) -> Outcome:
        # A webhook leaves no record id behind, so the link keeps none: the receiver tells
        # users apart by (source, user_id), and two tenants' users may share a user_id.
        return Outcome(
            Verdict.SUCCEEDED,
            reason=reason,
            external_id=None,
            properties_hash=message.properties_hash,
            email=intent.user.email,
            deprovisioned=intent.user.deprovisioned,
        )

    def _summary(self, message_id: str, answer: Answer) -> CallSummary:
        ok = answer.status is not None and 200 <= answer.status < 300
        category = answer.error_category or (None if ok else f"HTTP_{answer.status}")
        return CallSummary(
            request=scrub(f"POST {self._path} webhook-id={message_id}")[:255],
            status=answer.status,
            duration_ms=answer.duration_ms,
            error_category=category,
            response_excerpt=None if ok or answer.status is None else self._excerpt(answer.text),
        )

    def _excerpt(self, text: str) -> str:
        """The start of the receiver's answer, without secrets or unmasked emails."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return scrub(text.strip())[:EXCERPT_LIMIT] or "(empty answer)"


def _pause(reason: str, message: str, status: int) -> Outcome:
    return Outcome(
        Verdict.PAUSE,
        reason=reason,
        message=message,
        status_code=status,
        counts_against_budget=False,
    )


def _batch_deadline() -> Outcome:
    return Outcome(
        Verdict.RETRY,
        reason="batch_deadline",
        message="the batch reached its deadline before this message could be sent",
        counts_against_budget=False,
        retry_after=0.0,
    )
