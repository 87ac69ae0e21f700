"""The admin page: sign-in, CSRF, masking, replay; and one run in a real browser.

The Flask test-client tests run in-process against the real database and the
fake HubSpot. The browser test drives headless Chromium (Debian's, with its own
chromedriver: Selenium must not download anything) against a real gunicorn
ingest with the admin page on, beside the session's Celery workers.

Set ``IDSYNC_SCREENSHOT=docs/admin-page.png`` to have the browser test save a
screenshot of the deliveries list there.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from idsync.fakes.hubspot import FakeHubSpot
from idsync.settings import Settings
from idsync.stack import Stack, free_port, ingest_command
from ingest import create_app
from models.tables import Delivery, DeliveryStatus
from tests.events import auth0_event
from tests.pipeline import Pipeline
from workers.destinations.base import Headroom
from workers.metrics import HeadroomReporter

ADMIN_TOKEN = "admin-secret-token"
SECRET_KEY = "admin-page-secret-key-for-tests"
EMAIL = "ann.lee@example.com"
FLOWER_URL = "http://127.0.0.1:5555/"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


class RecordingWaker:
    """Stands in for the ingest's Waker: remembers which destinations were woken."""

    def __init__(self, redis: Any = None) -> None:
        self.woken: list[str] = []
        self.redis = redis  # where the page reads the rate-limit headroom

    def wake(self, destination: str) -> bool:
        self.woken.append(destination)
        return True


def admin_pipeline(
    settings: Settings, sessions: sessionmaker[Session], hubspot: FakeHubSpot, **update: Any
) -> Pipeline:
    configured = settings.model_copy(
        update={
            "retry_schedule": ("0s",) * 4,
            "admin_token": ADMIN_TOKEN,
            "secret_key": SECRET_KEY,
            **update,
        }
    )
    pipe = Pipeline(configured, sessions, hubspot)
    waker = pipe.app.extensions["idsync"].waker
    pipe.app.extensions["idsync"].waker = RecordingWaker(getattr(waker, "redis", None))
    return pipe


@pytest.fixture
def pipeline(
    settings: Settings, sessions: sessionmaker[Session], hubspot: FakeHubSpot
) -> Iterator[Pipeline]:
    """The shared pipeline with the admin page on (ADMIN_TOKEN and SECRET_KEY set)."""
    pipe = admin_pipeline(settings, sessions, hubspot)
    yield pipe
    pipe.close()


def csrf_token(page: Any) -> str:
    match = _CSRF.search(page.get_data(as_text=True))
    assert match, "the page has a form with a CSRF token"
    return match.group(1)


def sign_in(pipeline: Pipeline, token: str = ADMIN_TOKEN, next_page: str | None = None) -> Any:
    query = {"next": next_page} if next_page else {}
    form = pipeline.client.get("/admin/login", query_string=query)
    return pipeline.client.post(
        "/admin/login",
        query_string=query,
        data={"csrf_token": csrf_token(form), "token": token},
    )


def text_of(response: Any) -> str:
    return str(response.get_data(as_text=True))


def statuses(pipeline: Pipeline) -> list[str]:
    return [status for status, _ in pipeline.deliveries()]


def failed_update(pipeline: Pipeline) -> int:
    """Ann is created, then HubSpot rejects her update once (a 400): one failed delivery."""
    document = auth0_event("user.created", "auth0|ann", email=EMAIL, at=0)
    document["data"]["object"]["identities"][0]["access_token"] = "idp-access-token-value"
    pipeline.post(document)
    pipeline.drain()
    pipeline.post(auth0_event("user.updated", "auth0|ann", email=EMAIL, given_name="Ann", at=5))
    pipeline.hubspot.fail_next(1, status=400)
    pipeline.drain()
    assert pipeline.deliveries() == [("succeeded", None), ("failed", "rejected")]
    pipeline.app.extensions["idsync"].waker.woken.clear()  # the webhook's wake-ups
    return 2


# Signing in


@pytest.mark.parametrize(
    "path",
    ["/admin/", "/admin/?status=failed", "/admin/ui/deliveries/1", "/admin/ui/replay"],
)
def test_pages_need_sign_in(pipeline: Pipeline, path: str) -> None:
    response = pipeline.client.get(path)
    assert response.status_code == 302
    assert response.location.startswith("/admin/login?next=")


def test_sign_in_holds_a_hardened_session_and_sign_out_ends_it(pipeline: Pipeline) -> None:
    form = pipeline.client.get("/admin/login")
    assert form.status_code == 200 and 'type="password"' in text_of(form)
    response = sign_in(pipeline, next_page="/admin/?status=failed")
    assert response.status_code == 302 and response.location == "/admin/?status=failed"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("idsync_admin=")
    for flag in ("HttpOnly", "SameSite=Lax", "Secure", "Path=/admin"):
        assert flag in cookie, cookie
    page = pipeline.client.get("/admin/")
    assert page.status_code == 200 and "Sign out" in text_of(page)
    assert page.headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert pipeline.client.get("/admin/logout").status_code == 405
    out = pipeline.client.post("/admin/logout", data={"csrf_token": csrf_token(page)})
    assert out.status_code == 302 and out.location == "/admin/login"
    assert pipeline.client.get("/admin/").status_code == 302


@pytest.mark.parametrize(
    ("base_url", "warned"),
    [
        ("http://admin.internal:8000", True),
        ("https://admin.example.com", False),
        ("http://127.0.0.1:8000", False),
        ("http://[::1]:8000", False),
    ],
)
def test_sign_in_warns_when_the_secure_cookie_cannot_come_back(
    pipeline: Pipeline, base_url: str, warned: bool
) -> None:
    page = pipeline.client.get("/admin/login", base_url=base_url)
    assert ("ADMIN_COOKIE_SECURE=false" in text_of(page)) is warned


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/admin/", "/metrics"])
def test_sign_in_never_redirects_away_from_the_admin_page(pipeline: Pipeline, target: str) -> None:
    response = sign_in(pipeline, next_page=target)
    assert response.status_code == 302 and response.location == "/admin/"


@pytest.mark.parametrize("token", ["wrong-token", ADMIN_TOKEN + "x", "admin-secret-tökén", "管理"])
def test_a_wrong_token_is_rejected(pipeline: Pipeline, token: str) -> None:
    response = sign_in(pipeline, token=token)
    assert response.status_code == 401
    assert "That is not the admin token." in text_of(response)
    assert pipeline.client.get("/admin/").status_code == 302


def test_changing_the_admin_token_signs_everyone_out(pipeline: Pipeline) -> None:
    sign_in(pipeline)
    assert pipeline.client.get("/admin/").status_code == 200
    rotated = pipeline.settings.model_copy(update={"admin_token": "a-new-admin-token"})
    pipeline.app.extensions["idsync"].settings = rotated
    assert pipeline.client.get("/admin/").status_code == 302


def test_the_page_answers_503_without_a_secret_key(
    settings: Settings, sessions: sessionmaker[Session], hubspot: FakeHubSpot
) -> None:
    pipe = admin_pipeline(settings, sessions, hubspot, secret_key=None)
    try:
        for response in (
            pipe.client.get("/admin/"),
            pipe.client.get("/admin/login"),
            pipe.client.post("/admin/login", data={"token": ADMIN_TOKEN}),
            pipe.client.post("/admin/ui/replay", data={"status": "failed"}),
        ):
            assert response.status_code == 503
            assert "needs SECRET_KEY" in text_of(response)
        api = pipe.client.get(
            "/admin/deliveries", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert api.status_code == 200
    finally:
        pipe.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, True), ("true", True), ("1", True), ("false", False), ("off", False)],
)
def test_the_cookie_is_https_only_unless_turned_off(value: str | None, expected: bool) -> None:
    given = {} if value is None else {"admin_cookie_secure": value}
    assert Settings(**given).admin_cookie_secure is expected  # type: ignore[arg-type]


def test_an_unreadable_cookie_setting_is_an_error() -> None:
    with pytest.raises(ValueError, match="admin_cookie_secure"):
        Settings(admin_cookie_secure="sometimes")  # type: ignore[arg-type]


# CSRF


def test_posts_need_a_csrf_token(pipeline: Pipeline) -> None:
    failed_id = failed_update(pipeline)
    assert pipeline.client.post("/admin/login", data={"token": ADMIN_TOKEN}).status_code == 400
    sign_in(pipeline)
    for path, data in [
        ("/admin/logout", {}),
        (f"/admin/ui/deliveries/{failed_id}/replay", {}),
        ("/admin/ui/replay", {"status": "failed"}),
        ("/admin/ui/replay", {"status": "failed", "csrf_token": "forged"}),
    ]:
        response = pipeline.client.post(path, data=data)
        assert response.status_code == 400, path
        assert "Form expired or forged" in text_of(response)
    assert statuses(pipeline) == ["succeeded", "failed"]
    assert pipeline.client.get("/admin/").status_code == 200, "still signed in"
    assert pipeline.app.extensions["idsync"].waker.woken == []


def test_the_json_api_and_the_webhook_need_no_csrf_token(pipeline: Pipeline) -> None:
    accepted = pipeline.post(auth0_event("user.created", "auth0|bo", email="bo@example.com"))
    assert accepted.status_code == 202
    response = pipeline.client.post(
        "/admin/replay",
        json={"status": "succeeded", "dry_run": True},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert response.status_code == 200 and response.json["dry_run"] is True


# Pages


def test_pages_mask_personal_data(pipeline: Pipeline) -> None:
    failed_id = failed_update(pipeline)
    pipeline.post(auth0_event("user.updated", "auth0|cy", email="cy.nguyen@invalid"))
    pipeline.drain()
    sign_in(pipeline)
    pages = {
        path: pipeline.client.get(path)
        for path in (
            "/admin/",
            "/admin/?status=failed",
            "/admin/ui/deliveries/1",
            f"/admin/ui/deliveries/{failed_id}",
            "/admin/ui/deliveries/3",
            "/admin/ui/replay?status=failed",
        )
    }
    for path, page in pages.items():
        body = text_of(page)
        assert page.status_code == 200, path
        for secret in (
            "ann.lee@",
            "cy.nguyen@",
            "idp-access-token-value",
            "fake-token",
            ADMIN_TOKEN,
            SECRET_KEY,
        ):
            assert secret not in body, (path, secret)
    created = text_of(pages["/admin/ui/deliveries/1"])
    assert "a***@example.com" in created and '"access_token": "***"' in created
    assert "INVALID_EMAIL" in text_of(pages["/admin/ui/deliveries/3"])


def test_index_counts_by_status_and_filters_like_the_cli(pipeline: Pipeline) -> None:
    failed_update(pipeline)
    pipeline.post(auth0_event("user.created", "auth0|bo", email="bo@example.com", at=1))
    sign_in(pipeline)
    index = text_of(pipeline.client.get("/admin/"))
    assert re.search(r'destination=hubspot&amp;status=failed">1</a>', index)
    assert re.search(r'destination=hubspot&amp;status=succeeded">1</a>', index)
    assert re.search(r'destination=hubspot&amp;status=pending">1</a>', index)

    def ids(query: dict[str, str]) -> list[int]:
        page = pipeline.client.get("/admin/", query_string=query)
        assert page.status_code == 200, text_of(page)
        return [int(n) for n in re.findall(r'href="/admin/ui/deliveries/(\d+)"', text_of(page))]

    assert ids({}) == [3, 2, 1]
    assert ids({"status": "failed"}) == [2]
    assert ids({"subject": "auth0|bo"}) == [3]
    assert ids({"event_type": "user.updated", "destination": "hubspot"}) == [2]
    assert ids({"since": "1h", "until": "2999-01-01"}) == [3, 2, 1]
    assert ids({"until": "2000-01-01"}) == []
    bad = pipeline.client.get("/admin/", query_string={"status": "lost"})
    assert bad.status_code == 400 and "unknown status" in text_of(bad)


def test_index_shows_the_headroom_workers_reported(pipeline: Pipeline) -> None:
    sign_in(pipeline)
    assert re.search(r'<td class="muted">-</td>', text_of(pipeline.client.get("/admin/")))
    reporter = HeadroomReporter.from_settings(pipeline.settings, "hubspot")
    assert reporter is not None
    try:
        reporter(
            Headroom(
                max=100, remaining=87, interval_ms=10_000, daily=250_000, daily_remaining=249_000
            )
        )
        index = text_of(pipeline.client.get("/admin/"))
        assert "87/100 per 10 s; 249,000/250,000 today; seen 0 s ago" in index
    finally:
        reporter.client.delete(reporter.key)


def test_the_list_pages_with_an_older_link(pipeline: Pipeline) -> None:
    for n in range(5):
        pipeline.post(auth0_event("user.created", f"auth0|{n}", email=f"u{n}@example.com"))
    sign_in(pipeline)
    seen: list[list[int]] = []
    path: str | None = "/admin/?limit=2&event_type=user.created"
    while path:
        body = text_of(pipeline.client.get(path))
        seen.append([int(n) for n in re.findall(r'href="/admin/ui/deliveries/(\d+)"', body)])
        older = re.search(r'id="older" href="([^"]+)"', body)
        path = older.group(1).replace("&amp;", "&") if older else None
        assert path is None or "event_type=user.created" in path
    assert seen == [[5, 4], [3, 2], [1]]


def test_detail_shows_every_attempt_and_replays_one_delivery(pipeline: Pipeline) -> None:
    failed_id = failed_update(pipeline)
    sign_in(pipeline)
    page = pipeline.client.get(f"/admin/ui/deliveries/{failed_id}")
    body = text_of(page)
    assert "rejected" in body and 'id="replay"' in body
    assert re.search(r"PATCH /crm/v3/objects/contacts/\d+|POST /crm/v3/", body)
    assert '<td class="num">400</td>' in body
    assert '<dd id="received-via">webhook</dd>' in body
    response = pipeline.client.post(
        f"/admin/ui/deliveries/{failed_id}/replay", data={"csrf_token": csrf_token(page)}
    )
    assert response.status_code == 302
    assert response.location == f"/admin/ui/deliveries/{failed_id}"
    assert statuses(pipeline) == ["succeeded", "pending"]
    assert pipeline.app.extensions["idsync"].waker.woken == ["hubspot"]
    pending = text_of(pipeline.client.get(response.location))
    assert "pending again" in pending and 'id="replay"' not in pending
    pipeline.drain()
    done = text_of(pipeline.client.get(f"/admin/ui/deliveries/{failed_id}"))
    assert '<h1>Delivery 2 <span class="badge status-succeeded">' in done
    contact = pipeline.hubspot.contact_by_email(EMAIL)
    assert contact is not None and contact["properties"]["firstname"] == "Ann"
    assert pipeline.client.get("/admin/ui/deliveries/999").status_code == 404


def test_replay_all_matching_shows_the_count_first(pipeline: Pipeline) -> None:
    for n in range(3):
        pipeline.post(auth0_event("user.created", f"auth0|{n}", email=f"u{n}@invalid"))
    pipeline.post(auth0_event("user.created", "auth0|ok", email="ok@example.com"))
    pipeline.drain()
    assert statuses(pipeline) == ["failed", "failed", "failed", "succeeded"]
    pipeline.app.extensions["idsync"].waker.woken.clear()  # the webhook's wake-ups
    sign_in(pipeline)
    confirm = pipeline.client.get("/admin/ui/replay", query_string={"event_type": "user.created"})
    body = text_of(confirm)
    assert confirm.status_code == 200 and '<strong id="matched">3</strong>' in body
    assert '<input type="hidden" name="event_type" value="user.created">' in body
    assert statuses(pipeline) == ["failed", "failed", "failed", "succeeded"], "a dry run"
    response = pipeline.client.post(
        "/admin/ui/replay", data={"csrf_token": csrf_token(confirm), "event_type": "user.created"}
    )
    assert response.status_code == 302
    assert response.location == "/admin/?event_type=user.created"
    assert statuses(pipeline) == ["pending", "pending", "pending", "succeeded"]
    assert pipeline.app.extensions["idsync"].waker.woken == ["hubspot"]
    assert "3 of 3 matching deliveries are pending again" in text_of(
        pipeline.client.get(response.location)
    )
    nothing = text_of(pipeline.client.get("/admin/ui/replay", query_string={"status": "failed"}))
    assert "nothing to replay" in nothing and 'id="replay-all"' not in nothing
    busy = pipeline.client.get("/admin/ui/replay", query_string={"status": "pending"})
    assert busy.status_code == 400 and "still on their way" in text_of(busy)


def test_flower_is_linked_when_configured(
    settings: Settings, sessions: sessionmaker[Session], hubspot: FakeHubSpot, pipeline: Pipeline
) -> None:
    sign_in(pipeline)
    assert "Flower" not in text_of(pipeline.client.get("/admin/"))
    flower = admin_pipeline(settings, sessions, hubspot, flower_url="http://flower.internal:5555/")
    try:
        sign_in(flower)
        assert 'href="http://flower.internal:5555/"' in text_of(flower.client.get("/admin/"))
    finally:
        flower.destination.close()
        flower.app.extensions["idsync"].engine.dispose()


def test_the_admin_page_is_off_without_an_admin_token(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"secret_key": SECRET_KEY}))
    try:
        assert app.test_client().get("/admin/login").status_code == 404
    finally:
        app.extensions["idsync"].engine.dispose()


# A real browser against real processes


def _browser(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1440,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


def shows(browser: Any, selector: str, url: str = "") -> Any:
    """Wait until the page at a URL containing ``url`` shows ``selector``; return it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(driver: Any) -> Any:
        return url in driver.current_url and driver.find_elements(By.CSS_SELECTOR, selector)

    wait = WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(shown, f"{selector} at {url!r}; now at {browser.current_url}")[0]


@pytest.fixture
def admin_ingest(e2e: Any, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """A gunicorn ingest of this test's own with the admin page on, beside the e2e workers.

    It starts at once; call the fixture's value to wait until it answers and get its URL.
    """
    env = {
        **e2e.env,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "SECRET_KEY": SECRET_KEY,
        # ADMIN_COOKIE_SECURE stays at its default (true): browsers count loopback as a
        # secure context, so the Secure cookie comes back over plain http on 127.0.0.1.
        "FLOWER_URL": FLOWER_URL,
    }
    url = f"http://127.0.0.1:{free_port()}"
    stack = Stack(env=env, workdir=tmp_path)

    def ready() -> str:
        stack.wait_for_http(f"{url}/readyz", timeout=60)
        return url

    try:
        stack.start("admin-ingest", ingest_command(int(url.rsplit(":", 1)[1]), workers=1))
        yield ready
    finally:
        stack.stop_all()


@pytest.mark.e2e
@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)",
)
def test_an_operator_replays_a_failed_delivery_in_a_browser(
    e2e: Any, admin_ingest: Callable[[], str], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    for user, email in [
        ("auth0|ann", EMAIL),
        ("auth0|bo", "bo@example.com"),
        ("auth0|cy", "cy@example.com"),
    ]:
        assert e2e.post(auth0_event("user.created", user, email=email, at=0)).status_code == 202
    e2e.wait_finished(expected=3)
    # HubSpot rejects Ann's next update once; the fault then runs out, so a replay can succeed.
    e2e.hubspot.fail_next(1, status=400)
    update = auth0_event("user.updated", "auth0|ann", email=EMAIL, given_name="Ann", at=5)
    assert e2e.post(update).status_code == 202
    e2e.wait_finished(expected=4)
    assert e2e.count(DeliveryStatus.FAILED) == 1

    url = admin_ingest()
    browser = _browser(tmp_path / "chromium-profile")
    try:
        browser.get(f"{url}/admin/")
        assert "/admin/login" in browser.current_url
        browser.find_element(By.NAME, "token").send_keys(ADMIN_TOKEN)
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        shows(browser, "tr.row-failed")
        assert browser.find_element(By.LINK_TEXT, "Flower ↗").get_attribute("href") == FLOWER_URL
        if screenshot := os.environ.get("IDSYNC_SCREENSHOT"):
            browser.save_screenshot(screenshot)

        Select(browser.find_element(By.NAME, "status")).select_by_value("failed")
        browser.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
        shows(browser, "tr.row-failed", url="status=failed")
        [row] = browser.find_elements(By.CSS_SELECTOR, "#deliveries tbody tr")
        row.find_element(By.TAG_NAME, "a").click()
        shows(browser, "#replay", url="/admin/ui/deliveries/")
        page = browser.find_element(By.TAG_NAME, "body").text
        assert "rejected" in page and "400" in page
        assert "ann.lee@" not in browser.page_source

        browser.find_element(By.ID, "replay").click()
        assert "pending again" in shows(browser, ".flash").text
        deadline = time.monotonic() + 30
        while "succeeded" not in browser.find_element(By.TAG_NAME, "h1").text:
            assert time.monotonic() < deadline, "the replayed delivery did not succeed in 30s"
            time.sleep(0.2)
            browser.refresh()
    finally:
        browser.quit()
    contact = e2e.hubspot.contact_by_email(EMAIL)
    assert contact is not None and contact["properties"]["firstname"] == "Ann"
    with e2e.sessions() as session:
        replayed = session.scalars(select(Delivery).where(Delivery.subject == "auth0|ann")).all()
    assert sorted(row.status.value for row in replayed) == ["succeeded", "succeeded"]
