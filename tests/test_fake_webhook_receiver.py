"""The fake webhook receiver checks requests like a careful Standard Webhooks receiver, over HTTP.

Requests here are signed with the ``standardwebhooks`` package itself, so the
fake is tested against the reference implementation, not against idsync's signer.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from idsync.fakes.webhook_receiver import DEFAULT_SECRET, FakeWebhookReceiver

OTHER_SECRET = "whsec_" + base64.b64encode(b"another-receiver-secret-of-32-by").decode()


@pytest.fixture(scope="module")
def server() -> Iterator[FakeWebhookReceiver]:
    with FakeWebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def receiver(server: FakeWebhookReceiver) -> FakeWebhookReceiver:
    server.reset()
    return server


def signed(
    body: dict[str, Any],
    message_id: str = "msg_1",
    *,
    secret: str = DEFAULT_SECRET,
    at: datetime | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A body and the Standard Webhooks headers that sign it, made by the reference package."""
    moment = at or datetime.now(UTC)
    data = json.dumps(body, separators=(",", ":"))
    headers = {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, moment, data),
        "content-type": "application/json",
    }
    return data.encode(), headers


def send(receiver: FakeWebhookReceiver, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(receiver.url, data=body, headers=headers, timeout=5, allow_redirects=False)


MESSAGE = {"type": "user.upserted", "timestamp": "2025-02-01T12:34:56.000Z", "data": {"n": 1}}


def test_a_signed_message_is_kept_and_answered_200(receiver: FakeWebhookReceiver) -> None:
    answer = send(receiver, *signed(MESSAGE))
    assert answer.status_code == 200
    assert answer.json() == {"status": "received"}
    assert receiver.messages() == [MESSAGE]
    [entry] = receiver.requests_log
    assert (entry.status, entry.verified, entry.message_id) == (200, True, "msg_1")


def test_any_of_several_signatures_may_match(receiver: FakeWebhookReceiver) -> None:
    body, headers = signed(MESSAGE)
    _, other = signed(MESSAGE, secret=OTHER_SECRET)
    headers["webhook-signature"] = f"{other['webhook-signature']} {headers['webhook-signature']}"
    assert send(receiver, body, headers).status_code == 200
    receiver.set_secrets([OTHER_SECRET])
    headers["webhook-id"] = "msg_2"
    assert send(receiver, body, headers).status_code == 401  # signed over the old id


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda body, headers: (body + b" ", headers), id="body changed"),
        pytest.param(
            lambda body, headers: (body, headers | {"webhook-id": "msg_other"}), id="id changed"
        ),
        pytest.param(
            lambda body, headers: (body, {k: v for k, v in headers.items() if k != "webhook-id"}),
            id="no id",
        ),
        pytest.param(
            lambda body, headers: (body, headers | {"webhook-signature": "v1,AAAA"}),
            id="wrong signature",
        ),
        pytest.param(
            lambda body, headers: (body, headers | {"webhook-signature": "garbage"}),
            id="malformed signature",
        ),
        pytest.param(lambda body, _headers: signed(MESSAGE, secret=OTHER_SECRET), id="other key"),
        pytest.param(
            lambda body, _headers: signed(MESSAGE, at=datetime.now(UTC) - timedelta(minutes=6)),
            id="stale",
        ),
        pytest.param(
            lambda body, _headers: signed(MESSAGE, at=datetime.now(UTC) + timedelta(minutes=6)),
            id="from the future",
        ),
    ],
)
def test_an_unverifiable_request_is_401_and_kept_nowhere(
    receiver: FakeWebhookReceiver, tamper: Any
) -> None:
    body, headers = tamper(*signed(MESSAGE))
    assert send(receiver, body, headers).status_code == 401
    assert receiver.messages() == []
    [entry] = receiver.requests_log
    assert entry.status == 401 and not entry.verified and entry.error


def test_repeats_of_an_id_are_kept_together_and_shown_once(
    receiver: FakeWebhookReceiver,
) -> None:
    first = dict(MESSAGE, data={"n": 1})
    again = dict(MESSAGE, data={"n": 2})
    assert send(receiver, *signed(first, "msg_a")).json() == {"status": "received"}
    assert send(receiver, *signed(MESSAGE, "msg_b")).status_code == 200
    assert send(receiver, *signed(again, "msg_a")).json() == {"status": "duplicate"}
    assert receiver.messages() == [first, MESSAGE]
    assert receiver.message_ids() == ["msg_a", "msg_b"]
    assert receiver.received("msg_a") == [first, again]
    assert [entry.duplicate for entry in receiver.requests_log] == [False, False, True]


@pytest.mark.parametrize(
    ("status", "extra", "header"),
    [
        (503, {}, None),
        (401, {}, None),
        (410, {}, None),
        (429, {"retry_after": 7}, ("Retry-After", "7")),
        (
            308,
            {"location": "https://new.example.com/hook"},
            ("Location", "https://new.example.com/hook"),
        ),
    ],
)
def test_answer_next_answers_n_requests_then_verifies_again(
    receiver: FakeWebhookReceiver, status: int, extra: dict[str, Any], header: Any
) -> None:
    receiver.answer_next(2, status, **extra)
    answers = [send(receiver, *signed(MESSAGE, f"msg_{i}")) for i in range(3)]
    assert [answer.status_code for answer in answers] == [status, status, 200]
    if header:
        assert answers[0].headers[header[0]] == header[1]
    assert receiver.message_ids() == ["msg_2"]


def test_a_slow_answer_keeps_the_message_and_answers_late(receiver: FakeWebhookReceiver) -> None:
    receiver.slow_next(1, 0.4)
    started = time.monotonic()
    body, headers = signed(MESSAGE)
    with pytest.raises(requests.Timeout):
        requests.post(receiver.url, data=body, headers=headers, timeout=0.1)
    assert receiver.wait_for_messages(1) == [MESSAGE]  # kept before the answer
    assert time.monotonic() - started < 0.4
    answer = send(receiver, *signed(MESSAGE, "msg_late"))
    assert answer.status_code == 200


def test_a_held_request_waits_for_reset_and_keeps_nothing(receiver: FakeWebhookReceiver) -> None:
    receiver.hang_next(1)
    answers: list[requests.Response] = []
    sender = threading.Thread(target=lambda: answers.append(send(receiver, *signed(MESSAGE))))
    sender.start()
    while not receiver.requests_log:
        time.sleep(0.01)
    sender.join(0.3)
    assert sender.is_alive()  # still held
    receiver.reset()
    sender.join(5)
    assert answers[0].status_code == 503
    assert receiver.messages() == [] and receiver.requests_log == []


def test_other_paths_and_methods_are_refused(receiver: FakeWebhookReceiver) -> None:
    assert requests.get(receiver.url, timeout=5).status_code == 405
    elsewhere = receiver.url.replace(receiver.path, "/elsewhere")
    assert requests.post(elsewhere, data=signed(MESSAGE)[0], timeout=5).status_code == 404
    assert receiver.messages() == []


def test_connections_are_kept_alive(receiver: FakeWebhookReceiver) -> None:
    with requests.Session() as session:
        for number in range(3):
            body, headers = signed(MESSAGE, f"msg_{number}")
            assert session.post(receiver.url, data=body, headers=headers, timeout=5).ok
    assert receiver.connections_opened == 1


def test_answers_leave_at_once_without_waiting_for_an_ack(receiver: FakeWebhookReceiver) -> None:
    """Headers and body are two sends: with Nagle on, each answer waits ~40 ms for an ACK."""
    with requests.Session() as session:
        body, headers = signed(MESSAGE, "msg_nodelay")
        assert session.post(receiver.url, data=body, headers=headers, timeout=5).ok
        server = receiver._server
        assert server is not None
        with server.connections_lock:
            open_sockets = list(server.connections)
        assert open_sockets, "the kept-alive connection is still open"
        for connection in open_sockets:
            assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
