"""Segment: keep each Auth0 user's traits in step, in batch calls under the rate limit.

The rules (``shared/reference/destinations.md``, "Segment"; segment-docs,
"HTTP API Source"):

- One ``identify`` per user (and a ``track`` after it when the user is newly
  deprovisioned or deleted, see ``payload``), many users per ``POST /v1/batch``.
  A request is cut by size as well as by count: Segment refuses a message over
  32 KB and a batch over 500 KB. A user whose message alone is too large fails
  ``too_large`` without a call; the others are sent.
- Segment answers 200 to everything it does not refuse for size or JSON, even
  to messages it then drops and to a write key it does not know. A 200 is
  therefore recorded as "accepted by Segment", never as applied, and a revoked
  key cannot be seen from here: nothing pauses for it.
- 429 (Segment's answer to very high volume) waits out ``Retry-After`` /
  ``X-RateLimit-Reset`` without spending the budget, and holds back every
  worker; 408 and 5xx are retried; a timeout or a lost connection is retried
  and marks the users uncertain (harmless: Segment deduplicates on messageId).
- A 400 or 413 for a batch of several users is split and the halves sent
  again, until the refused user is alone; it then fails with Segment's answer.
  A redirect, a 401/403 (an OAuth-only source, or a proxy) and a 404 (a base
  URL with a path) pause the destination: they are configuration, not users.
- Segment cannot be read back (``read`` is None), and there is no record id:
  the user's id stands for it in the link, as for a webhook.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

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
from workers.destinations.segment.client import BATCH_PATH, Answer, SegmentClient
from workers.destinations.segment.payload import (
    BATCH_OVERHEAD,
    EventNames,
    UserMessages,
    batch_body,
    build_messages,
)
from workers.destinations.segment.settings import MAX_BATCH_MESSAGES, Config

if TYPE_CHECKING:
    from idsync.settings import Settings

# segment-docs, "HTTP API Source", "Max request size": 32 KB per message (Segment's
# own Python library counts 32 << 10 bytes) and 500 KB per batch request. Batches
# stay under 475,000 bytes, the margin Segment's Python library keeps below 500 KB.
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 475_000
# A worker holding claims waits at most this long for a request slot, and never
# more than a quarter of its lease, so that no claim expires while it waits.
LIMITER_WAIT_SECONDS = 20.0
EXCERPT_LIMIT = 500
# A 429 without Retry-After or X-RateLimit-Reset waits at least this long.
MIN_THROTTLE_SECONDS = 1.0
ACCEPTED = "accepted by Segment"
ACCEPTED_NOTE = (
    f"{ACCEPTED}; Segment answers 200 also to messages it drops and to an unknown "
    "write key, and cannot be read back"
)


def build(
    config: Config,
    settings: Settings,
    limiter: Limiter,
    on_headroom: Callable[[Headroom], None] | None = None,
) -> SegmentDestination:
    """The adapter of one Segment destination (the registry's entry point).

    Segment reports no rate-limit headroom, so ``on_headroom`` is never called.
    ValueError when the destination has no write key.
    """
    problem = config.missing()
    if problem:
        raise ValueError(problem)
    limiter_wait = min(LIMITER_WAIT_SECONDS, settings.lease_seconds / 4)
    return SegmentDestination(config, limiter, limiter_wait=limiter_wait)


class SegmentDestination:
    """Sends users' newest states to one Segment source as batched identify calls."""

    # An absent mapped field is sent as JSON null, which clears the trait.
    clears_with: str | None = None

    def __init__(
        self,
        config: Config,
        limiter: Limiter,
        *,
        limiter_wait: float = LIMITER_WAIT_SECONDS,
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        if not config.write_key:
            raise ValueError(f"{config.prefix}WRITE_KEY is not set")
        self.name = config.name
        self.config = config
        self.limiter = limiter
        self.limiter_wait = limiter_wait
        self.batch_size = config.batch_size
        self.max_batch_bytes = max_batch_bytes
        self.mapping = config.mapping()
        self.events = EventNames(config.deprovisioned_event, config.deleted_event)
        self._secrets = config.secrets()
        register_secrets(self._secrets)
        self.client = SegmentClient(
            config.base_url,
            config.write_key,
            connect_timeout=config.connect_timeout_seconds,
            timeout=config.timeout_seconds,
        )

    def __repr__(self) -> str:
        return f"SegmentDestination(name={self.name!r}, base_url={self.config.base_url!r})"

    def close(self) -> None:
        """Close the kept-alive connection."""
        self.client.close()

    def read(self, external_ids: list[str]) -> dict[str, dict[str, Any]] | None:
        """None: the Tracking API is write-only; what idsync sent is all it knows."""
        return None

    def probe(self) -> str | None:
        """None when Segment accepts an empty batch at the base URL, else why not.

        It proves the endpoint, not the write key: Segment accepts any key.
        """
        try:
            self.limiter.acquire(self.limiter_wait)
        except LimiterTimeout as error:
            return f"no request slot: {error}"
        answer = self.client.post_batch(batch_body([]))
        refusal = self.refusal(answer)
        return None if refusal is None else refusal.message

    def deliver(
        self, intents: list[Intent], *, claim: ContactClaim, deadline: float
    ) -> dict[str, Outcome]:
        """Send every changed user's messages in as few batch calls as the limits allow."""
        outcomes: dict[str, Outcome] = {}
        ready: list[UserMessages] = []
        for intent in intents:
            prepared = self._prepare(intent)
            if isinstance(prepared, Outcome):
                outcomes[intent.key] = prepared
            else:
                ready.append(prepared)
        if ready:
            run = _Run(self, {i.key: i for i in intents}, deadline)
            outcomes |= run.send(self.cut(ready))
        return outcomes

    def cut(self, users: list[UserMessages]) -> Iterator[list[UserMessages]]:
        """Users in request-sized groups: under the byte and message limits, order kept.

        A user's identify and track always travel in the same request.
        """
        group: list[UserMessages] = []
        size, count = BATCH_OVERHEAD, 0
        for user in users:
            fits = size + user.size <= self.max_batch_bytes
            if group and (not fits or count + len(user.encoded) > MAX_BATCH_MESSAGES):
                yield group
                group, size, count = [], BATCH_OVERHEAD, 0
            group.append(user)
            size += user.size
            count += len(user.encoded)
        if group:
            yield group

    # Preparing

    def _prepare(self, intent: Intent) -> UserMessages | Outcome:
        """The user's messages, or the outcome that needs no call."""
        try:
            messages = build_messages(intent, self.mapping, self.events)
        except ValueError as error:
            return Outcome(Verdict.FAILED, reason="unencodable", message=scrub(str(error))[:1000])
        if messages.largest > MAX_MESSAGE_BYTES:
            return Outcome(
                Verdict.FAILED,
                reason="too_large",
                message=(
                    f"the identify for this user is {messages.largest} bytes; Segment accepts "
                    f"at most {MAX_MESSAGE_BYTES} bytes (32 KB) per message: map fewer or "
                    f"smaller fields in {self.config.prefix}PROPERTY_MAP"
                ),
                email=intent.user.email,
            )
        if self._unchanged(intent, messages):
            return self._outcome(Verdict.SKIPPED, intent, messages, reason="unchanged")
        return messages

    @staticmethod
    def _unchanged(intent: Intent, messages: UserMessages) -> bool:
        """Whether Segment was sent this state already, and no other may still land."""
        link = intent.link
        same = messages.properties_hash == link.properties_hash
        return same and not intent.force and not link.uncertain

    # Answers

    def refusal(self, answer: Answer) -> Outcome | None:
        """None when Segment accepted the batch; otherwise what the answer means."""
        status, prefix = answer.status, self.config.prefix
        if status is None:
            return Outcome(
                Verdict.RETRY,
                reason="timeout" if answer.error_category == "TIMEOUT" else "connection_error",
                message=(
                    f"no answer from Segment ({answer.error_category}); a repeat of a batch "
                    "that did arrive is dropped by Segment by its messageIds"
                ),
                uncertain=answer.maybe_delivered,
            )
        if 200 <= status < 300:
            return None
        excerpt = self.excerpt(answer.text)
        if 300 <= status < 400:
            location = scrub(answer.location or "no Location")[:EXCERPT_LIMIT]
            return _pause(
                "redirected",
                f"Segment's endpoint redirects (HTTP {status}) to {location}; idsync does not "
                f"follow redirects: set {prefix}BASE_URL to your region's API root",
                status,
            )
        if status in (401, 403):
            return _pause(
                "credentials_refused",
                f"the endpoint refused the request (HTTP {status}): {excerpt}. Segment itself "
                f"answers 200 to any write key, so check {prefix}BASE_URL (a proxy?) and "
                f"that the source accepts its write key over Basic auth ({prefix}WRITE_KEY)",
                status,
            )
        if status in (404, 405):
            return _pause(
                "wrong_endpoint",
                f"no Segment batch API at {self.client.url} (HTTP {status}): set "
                f"{prefix}BASE_URL to the API root, e.g. https://api.segment.io",
                status,
            )
        if status == 429:
            return Outcome(
                Verdict.RETRY,
                reason="rate_limited",
                message=f"Segment is rate limiting (HTTP 429): {excerpt}",
                status_code=status,
                counts_against_budget=False,
                retry_after=self._throttle_wait(answer.retry_after),
            )
        if status == 408 or status >= 500:
            return Outcome(
                Verdict.RETRY,
                reason="server_error" if status >= 500 else "request_timeout",
                message=f"Segment answered HTTP {status}: {excerpt}",
                status_code=status,
                retry_after=answer.retry_after,
            )
        too_large = status == 413 or any(
            word in answer.text.lower() for word in ("large", "size", "exceed")
        )
        return Outcome(
            Verdict.FAILED,
            reason="too_large" if too_large else "rejected",
            message=f"Segment refused the batch (HTTP {status}): {excerpt}",
            status_code=status,
        )

    def _throttle_wait(self, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return max(MIN_THROTTLE_SECONDS, self.config.rate[1])

    def _outcome(
        self,
        verdict: Verdict,
        intent: Intent,
        messages: UserMessages,
        *,
        reason: str,
        message: str | None = None,
    ) -> Outcome:
        # Segment keeps no record id: the user's id stands for it, as for a webhook.
        user = intent.user
        return Outcome(
            verdict,
            reason=reason,
            message=message,
            external_id=user.subject,
            properties_hash=messages.properties_hash,
            email=user.email,
            deprovisioned=user.deprovisioned,
        )

    def accepted(self, intent: Intent, messages: UserMessages) -> Outcome:
        """A success as far as Segment can say: the batch was accepted."""
        return self._outcome(
            Verdict.SUCCEEDED, intent, messages, reason="accepted", message=ACCEPTED_NOTE
        )

    def summary(self, user: UserMessages, group: list[UserMessages], answer: Answer) -> CallSummary:
        """The attempt as one user's delivery records it: its messages, the request, the answer."""
        ok = answer.status is not None and 200 <= answer.status < 300
        body_bytes = BATCH_OVERHEAD + sum(member.size for member in group) - 1
        messages = sum(len(member.encoded) for member in group)
        track = " +track" if len(user.encoded) > 1 else ""
        if ok:
            excerpt: str | None = f"{ACCEPTED} (HTTP {answer.status}): {self.excerpt(answer.text)}"
        else:
            excerpt = None if answer.status is None else self.excerpt(answer.text)
        return CallSummary(
            request=scrub(
                f"POST {BATCH_PATH} messageId={user.message_id}{track} "
                f"({messages} messages, {body_bytes} bytes)"
            )[:255],
            status=answer.status,
            duration_ms=answer.duration_ms,
            error_category=answer.error_category or (None if ok else f"HTTP_{answer.status}"),
            response_excerpt=excerpt[:EXCERPT_LIMIT] if excerpt else None,
        )

    def excerpt(self, text: str) -> str:
        """The start of an answer, without the write key or any email address."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return scrub(text.strip())[:EXCERPT_LIMIT] or "(empty answer)"


@dataclass
class _Run:
    """One ``deliver``: the requests still to send, and what each user has come to."""

    destination: SegmentDestination
    intents: dict[str, Intent]
    deadline: float
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    calls: dict[str, list[CallSummary]] = field(default_factory=lambda: defaultdict(list))
    halted: Outcome | None = None  # what every request not yet sent answers instead

    def send(self, groups: Iterator[list[UserMessages]]) -> dict[str, Outcome]:
        """Send each group in turn; a refused group of several is split and sent again."""
        queue = deque(groups)
        while queue:
            group = queue.popleft()
            split = self._send(group)
            if split:
                queue.extendleft(reversed(split))
        for key, outcome in self.outcomes.items():
            outcome.calls = list(self.calls.get(key, []))
        return self.outcomes

    def _send(self, group: list[UserMessages]) -> list[list[UserMessages]] | None:
        """Send one request; the halves to send again when Segment refused a group of several."""
        waiting = self._waiting()
        if waiting is not None:
            self._answer_all(group, waiting)
            return None
        destination = self.destination
        try:
            destination.limiter.acquire(min(destination.limiter_wait, self._left()))
        except LimiterTimeout as error:
            busy = Outcome(
                Verdict.RETRY,
                reason="limiter_busy",
                message=str(error),
                counts_against_budget=False,
                retry_after=5.0,
            )
            self.halted = busy
            self._answer_all(group, busy)
            return None
        if self._left() <= 0:
            self._answer_all(group, _batch_deadline())
            return None
        answer = destination.client.post_batch(batch_body(group))
        for user in group:
            self.calls[user.key].append(destination.summary(user, group, answer))
        refusal = destination.refusal(answer)
        if refusal is None:
            for user in group:
                self.outcomes[user.key] = destination.accepted(self.intents[user.key], user)
            return None
        if refusal.verdict is Verdict.FAILED and len(group) > 1:
            middle = len(group) // 2
            return [group[:middle], group[middle:]]
        self._answer_all(group, refusal)
        self._halt_after(refusal)
        return None

    def _halt_after(self, refusal: Outcome) -> None:
        """A pause, a throttle or an unreachable Segment concerns the requests not yet sent."""
        if refusal.verdict is Verdict.PAUSE:
            self.halted = refusal
        elif refusal.reason == "rate_limited":
            self.destination.limiter.block_for(refusal.retry_after or 0.0)
            self.halted = replace(refusal, reason="throttled")
        elif refusal.verdict is Verdict.RETRY:
            self.halted = Outcome(
                Verdict.RETRY,
                reason="not_sent",
                message=f"not sent: an earlier request of the batch ended {refusal.reason}",
                counts_against_budget=False,
                retry_after=refusal.retry_after,
            )

    def _waiting(self) -> Outcome | None:
        if self.halted is not None:
            return self.halted
        if self._left() <= 0:
            return _batch_deadline()
        return None

    def _left(self) -> float:
        return self.deadline - time.monotonic()

    def _answer_all(self, group: list[UserMessages], outcome: Outcome) -> None:
        for user in group:
            email = self.intents[user.key].user.email
            self.outcomes[user.key] = replace(outcome, calls=[], email=email)


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
        message="the batch reached its deadline before this user's messages could be sent",
        counts_against_budget=False,
        retry_after=0.0,
    )
