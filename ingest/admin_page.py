"""The admin page: deliveries by status, why one failed, and a button to replay it.

Server-rendered HTML beside the JSON API (``ingest/admin.py``), registered only
when ``ADMIN_TOKEN`` is set and meant for an internal network. Operators sign in
at ``/admin/login`` with the admin token; the session is a cookie signed with
``SECRET_KEY`` (the same in every ingest process), so without that key the page
answers 503 and only the bearer-token API works. Every form that changes
something carries a CSRF token (Flask-WTF). Pages show the masked views of
``models.views`` only: emails are masked and credentials never appear.

Routes live at ``/admin/`` and under ``/admin/ui/``, apart from the JSON API's.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from flask_wtf.csrf import CSRFError, CSRFProtect
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response
from wtforms import PasswordField
from wtforms.validators import DataRequired

from idsync.settings import Settings
from ingest.admin import delivery_filter, find_delivery, known_headroom, shown_detail
from ingest.auth import secret_matches
from models.commands import destination_states, replay
from models.db import transaction
from models.guard import approve_deprovisions, held_counts
from models.queries import counts_by_status, list_deliveries
from models.tables import FINISHED, DeliveryStatus
from models.views import delivery_view, destination_view, headroom_text

log = logging.getLogger(__name__)
blueprint = Blueprint("admin_page", __name__, template_folder="templates")

SESSION_LIFETIME = timedelta(hours=12)
FILTER_NAMES = ("status", "destination", "event_type", "subject", "since", "until")
EVENT_TYPES = ("user.created", "user.updated", "user.deleted")
STATUSES = tuple(status.value for status in DeliveryStatus)
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
# The page holds no script; inline styles are its only resource.
_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


# Set-up


def install(app: Flask, settings: Settings, *, csrf_exempt: Iterable[Blueprint] = ()) -> None:
    """Register the admin page on ``app`` with its session cookie and CSRF protection.

    ``csrf_exempt`` names the blueprints that authenticate every request with a
    bearer token (the webhook, the JSON API): a browser never adds that header by
    itself, so a forged request cannot carry it and they need no CSRF token.
    """
    app.config.update(
        SESSION_COOKIE_NAME="idsync_admin",
        SESSION_COOKIE_PATH="/admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.admin_cookie_secure,
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
    )
    if settings.secret_key:
        app.secret_key = settings.secret_key
        csrf = CSRFProtect(app)
        for exempt in csrf_exempt:
            csrf.exempt(exempt)
    else:
        log.warning("ADMIN_TOKEN is set but SECRET_KEY is not: the admin page answers 503")
    app.register_blueprint(blueprint)


def _state() -> Any:
    return current_app.extensions["idsync"]


def _settings() -> Settings:
    return _state().settings  # type: ignore[no-any-return]


# Signing in


class SignInForm(FlaskForm):
    """The admin token, typed into a password field."""

    token = PasswordField("Admin token", validators=[DataRequired()])


def _fingerprint(settings: Settings) -> str:
    """What a session holds: tied to the admin token, so rotating it signs everyone out."""
    key = (settings.secret_key or "").encode("utf-8")
    message = b"idsync-admin:" + (settings.admin_token or "").encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def _signed_in() -> bool:
    held = session.get("admin")
    return isinstance(held, str) and hmac.compare_digest(held, _fingerprint(_settings()))


def _safe_next(target: str | None) -> str:
    """``target`` if it is a page of this admin site, else the index (no open redirect).

    A control character or a space is refused too: a CR or LF would split the
    Location header, and the others have no place in a link of this site.
    """
    if target and target.isprintable() and not any(ch.isspace() for ch in target):
        parts = urlsplit(target)
        local = not parts.scheme and not parts.netloc and "\\" not in target
        if local and target.startswith("/admin/") and not target.startswith("//"):
            return target
    return url_for(".index")


@blueprint.before_request
def _require_sign_in() -> ResponseReturnValue | None:
    """Every page needs SECRET_KEY configured and a signed-in session."""
    if not _settings().secret_key:
        message = (
            "The admin page needs SECRET_KEY: set it to a long random value, the same "
            "in every ingest process, and restart. The JSON API under /admin/ still "
            "works with Authorization: Bearer $ADMIN_TOKEN."
        )
        return _error_page(503, "Admin page not configured", message)
    if request.endpoint == "admin_page.login" or _signed_in():
        return None
    return redirect(url_for(".login", next=request.full_path.rstrip("?")))


@blueprint.after_request
def _harden(response: Response) -> Response:
    """Pages hold personal data (masked) and buttons: no caching, no framing."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Content-Security-Policy"] = _CONTENT_SECURITY_POLICY
    return response


@blueprint.route("/admin/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    """The sign-in form; the admin token is compared in constant time."""
    form = SignInForm()
    if form.validate_on_submit():
        settings = _settings()
        presented = (form.token.data or "").encode("utf-8")
        if settings.admin_token and secret_matches(presented, [settings.admin_token]):
            session.clear()  # a fresh session, so nothing set before sign-in carries over
            session.permanent = True
            session["admin"] = _fingerprint(settings)
            log.info("admin page: operator signed in")
            return redirect(_safe_next(request.args.get("next")))
        log.warning("admin page: sign-in with a wrong token from %s", request.remote_addr)
        form.token.errors = ["That is not the admin token."]
        return _render("login.html", 401, form=form, cookie_warning=_cookie_may_be_dropped())
    return _render("login.html", 200, form=form, cookie_warning=_cookie_may_be_dropped())


def _cookie_may_be_dropped() -> bool:
    """Whether a browser may refuse the https-only cookie: plain http, not on loopback."""
    host = urlsplit(request.host_url).hostname or ""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    return bool(current_app.config["SESSION_COOKIE_SECURE"]) and not (request.is_secure or loopback)


@blueprint.post("/admin/logout")
def logout() -> ResponseReturnValue:
    """Forget the session."""
    session.clear()
    flash("Signed out.")
    return redirect(url_for(".login"))


# Pages


def _filter_params() -> dict[str, str]:
    """The list's filters from the query string, empty ones left out."""
    return {name: request.args[name] for name in FILTER_NAMES if request.args.get(name)}


def _destinations(counts: Mapping[str, Any]) -> list[str]:
    return sorted({*_settings().destinations, *counts})


def _missing(name: str) -> str | None:
    """What a configured destination's settings lack (one that is no longer configured: None)."""
    settings = _settings()
    return settings.destination(name).missing() if name in settings.destinations else None


@blueprint.get("/admin/")
def index() -> ResponseReturnValue:
    """Counts by status per destination, and the deliveries that match the filters."""
    params = _filter_params()
    paging = {name: request.args.get(name) for name in ("limit", "cursor")}
    error = None
    deliveries: list[dict[str, Any]] = []
    next_cursor = None
    try:
        item = delivery_filter({**params, **paging})
    except ValueError as invalid:
        item, error = None, str(invalid)
    with transaction(_state().sessions) as db:
        counts = counts_by_status(session=db)
        states = destination_states(session=db)
        held = held_counts(session=db)
        if item is not None:
            rows, next_cursor = list_deliveries(session=db, filter=item)
            deliveries = [delivery_view(row) for row in rows]
    headroom = known_headroom(_state())
    destinations = [
        destination_view(
            name,
            states.get(name),
            counts.get(name, {}),
            missing=_missing(name),
            headroom=headroom.get(name),
        )
        for name in _destinations(counts)
    ]
    return _render(
        "index.html",
        400 if error else 200,
        destinations=destinations,
        deliveries=deliveries,
        filters=params,
        error=error,
        cursor=paging["cursor"],
        limit=paging["limit"],
        next_cursor=next_cursor,
        destination_names=_destinations(counts),
        held=held,
    )


@blueprint.get("/admin/ui/deliveries/<int:delivery_id>")
def delivery(delivery_id: int) -> ResponseReturnValue:
    """One delivery, its event (masked) and every attempt."""
    with transaction(_state().sessions) as db:
        detail = find_delivery(session=db, delivery_id=delivery_id)
        if detail is None:
            return _error_page(404, "Not found", f"There is no delivery {delivery_id}.")
        view = shown_detail(detail)
        replayable = detail.delivery.status in FINISHED and detail.event.payload is not None
    return _render("delivery.html", 200, detail=view, replayable=replayable)


@blueprint.post("/admin/ui/deliveries/<int:delivery_id>/replay")
def replay_delivery(delivery_id: int) -> ResponseReturnValue:
    """Put one finished delivery back to pending and wake the workers."""
    with transaction(_state().sessions) as db:
        detail = find_delivery(session=db, delivery_id=delivery_id)
        if detail is None:
            return _error_page(404, "Not found", f"There is no delivery {delivery_id}.")
        result = replay(session=db, delivery_ids=[delivery_id])
        status = detail.delivery.status.value
        purged = detail.event.payload is None
    if result.replayed:
        _wake(result.destinations)
        log.warning("operator replayed delivery %d from the admin page", delivery_id)
        flash(f"Delivery {delivery_id} is pending again; the workers were woken.")
    elif purged:
        flash(f"The event of delivery {delivery_id} was purged; nothing is left to send.")
    else:
        flash(f"Delivery {delivery_id} is {status}: still on its way, nothing to replay.")
    return redirect(url_for(".delivery", delivery_id=delivery_id))


@blueprint.get("/admin/ui/replay")
def confirm_replay() -> ResponseReturnValue:
    """How many deliveries the filters match (a dry run), with a button to replay them."""
    params = _filter_params()
    try:
        item = delivery_filter(params)
        with transaction(_state().sessions) as db:
            result = replay(session=db, filter=item, dry_run=True)
    except ValueError as invalid:
        return _render("replay.html", 400, filters=params, error=str(invalid), result=None)
    return _render("replay.html", 200, filters=params, error=None, result=result)


@blueprint.post("/admin/ui/replay")
def replay_matching() -> ResponseReturnValue:
    """Replay every delivery the confirmed filters match, then show them on their way."""
    params = {name: request.form[name] for name in FILTER_NAMES if request.form.get(name)}
    try:
        item = delivery_filter(params)
        with transaction(_state().sessions) as db:
            result = replay(session=db, filter=item)
    except ValueError as invalid:
        return _render("replay.html", 400, filters=params, error=str(invalid), result=None)
    _wake(result.destinations)
    log.warning("operator replayed %d deliveries from the admin page", result.replayed)
    flash(f"{result.replayed} of {result.matched} matching deliveries are pending again.")
    # The replayed ones are pending now; show the same selection in any status.
    shown: dict[str, Any] = {name: value for name, value in params.items() if name != "status"}
    return redirect(url_for(".index", **shown))


@blueprint.post("/admin/ui/destinations/<name>/approve-deprovisions")
def approve_held(name: str) -> ResponseReturnValue:
    """Release the deprovisions the guard holds for ``name`` and wake its workers."""
    if name not in _settings().destinations:
        return _error_page(404, "Not found", f"There is no destination {name}.")
    with transaction(_state().sessions) as db:
        released = approve_deprovisions(session=db, destination=name)
    if released:
        _wake([name])
        log.warning(
            "operator approved %d held deprovisions to %s from the admin page", released, name
        )
        flash(f"Released {released} held deprovisions to {name}; the workers were woken.")
    else:
        flash(f"Nothing is held for {name}.")
    return redirect(url_for(".index"))


def _wake(destinations: Iterable[str]) -> None:
    """Tell the workers that work waits (best effort: the sweep is the backstop)."""
    for destination in destinations:
        _state().waker.wake(destination)


# Rendering and errors


def _render(template: str, code: int, **context: Any) -> ResponseReturnValue:
    return render_template(
        f"admin/{template}",
        flower_url=_settings().flower_url,
        signed_in=_signed_in(),
        statuses=STATUSES,
        event_types=EVENT_TYPES,
        **context,
    ), code


def _error_page(code: int, title: str, message: str) -> ResponseReturnValue:
    signed_in = bool(_settings().secret_key) and _signed_in()
    return render_template(
        "admin/error.html", title=title, message=message, signed_in=signed_in, flower_url=None
    ), code


@blueprint.errorhandler(CSRFError)
def _csrf_error(error: CSRFError) -> ResponseReturnValue:
    message = (
        f"This form could not be accepted ({error.description}) It may have expired "
        "or come from another site: go back, reload the page and try again."
    )
    return _error_page(400, "Form expired or forged", message)


@blueprint.errorhandler(HTTPException)
def _http_error(error: HTTPException) -> ResponseReturnValue:
    code = error.code or 500
    return _error_page(code, error.name, error.description or "")


@blueprint.errorhandler(SQLAlchemyError)
def _database_error(error: SQLAlchemyError) -> ResponseReturnValue:
    log.error("admin page failed: database unavailable (%s)", type(error).__name__)
    return _error_page(503, "Database unavailable", "The outbox database does not answer; retry.")


@blueprint.app_template_filter("admin_time")
def _admin_time(value: str | None) -> str:
    """An ISO time from the masked views as ``2025-03-01 12:00:05`` (UTC)."""
    if not value:
        return ""
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


@blueprint.app_template_filter("headroom")
def _headroom(value: dict[str, float] | None) -> str:
    """A destination's rate-limit headroom in a few words (``-``: none reported)."""
    return headroom_text(value)
