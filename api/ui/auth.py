"""Dashboard sessions: the API key in an HttpOnly, SameSite=Strict cookie, and CSRF tokens.

Logging in posts the key in a form body (never a URL); it is checked exactly as a bearer
key is (`api.deps.get_tenant`), so a revoked key ends the session at its next request.
State-changing forms carry a CSRF token, an HMAC of the session's key under the service
secret: a page of another origin can neither read it nor compute it. Posts whose Origin
header names another origin are refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Form, Request
from fastapi.security import HTTPAuthorizationCredentials

from api.deps import SessionDep, SettingsDep, get_tenant
from api.errors import APIError
from store.models import Tenant
from store.settings import Settings

COOKIE = "hcnr_ui_session"
COOKIE_PATH = "/ui"


class LoginRequired(Exception):
    """No valid session. Pages redirect to the login form; other routes answer 401."""

    def __init__(self, redirect: bool):
        super().__init__("login required")
        self.redirect = redirect


@dataclass
class UiSession:
    tenant: Tenant
    csrf: str


def csrf_token(settings: Settings, key: str) -> str:
    return hmac.new(
        settings.secret_key.encode(), b"hcnr-ui-csrf\x00" + key.encode(), hashlib.sha256
    ).hexdigest()


def authenticate(session, key: str) -> Tenant | None:
    """The tenant of `key` through the API's own bearer-key check; None when invalid."""
    try:
        return get_tenant(session, HTTPAuthorizationCredentials(scheme="Bearer", credentials=key))
    except APIError:
        return None


def _session(request: Request, session, settings: Settings, redirect: bool) -> UiSession:
    key = request.cookies.get(COOKIE)
    tenant = authenticate(session, key) if key else None
    if tenant is None:
        raise LoginRequired(redirect)
    return UiSession(tenant, csrf_token(settings, key))


def page_session(request: Request, session: SessionDep, settings: SettingsDep) -> UiSession:
    return _session(request, session, settings, redirect=True)


def api_session(request: Request, session: SessionDep, settings: SettingsDep) -> UiSession:
    return _session(request, session, settings, redirect=False)


def same_origin(request: Request) -> None:
    """Refuse a cross-origin post (browsers send Origin on every POST)."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin != expected:
        raise APIError("forbidden", "cross-origin request refused")


def form_session(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    csrf_token_: Annotated[str, Form(alias="csrf_token")] = "",
) -> UiSession:
    """A session for a state-changing form post: valid cookie, same origin, CSRF token."""
    same_origin(request)
    ui = _session(request, session, settings, redirect=False)
    if not hmac.compare_digest(csrf_token_.encode(), ui.csrf.encode()):
        raise APIError("forbidden", "missing or invalid CSRF token")
    return ui


PageSession = Annotated[UiSession, Depends(page_session)]
ApiSession = Annotated[UiSession, Depends(api_session)]
FormSession = Annotated[UiSession, Depends(form_session)]
