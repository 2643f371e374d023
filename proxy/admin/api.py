"""Routes of the admin listener: the JSON API under /api/v1, and the entry point that
sends everything else to the dashboard, with the security headers every answer gets.

Every change goes through proxy.registry.Registry, so the API applies exactly the
rules (and words) of the CLI; this module only translates HTTP to registry calls.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import msgspec

from proxy import names
from proxy.admin import forms
from proxy.admin.auth import Auth, Session
from proxy.admin.dashboard import Dashboard, Reload
from proxy.admin.wire import HttpError, Request, Response
from proxy.errors import BundleError, InvalidName, RegistryError, StoreError
from proxy.registry import Registry

log = logging.getLogger("tlsedge.admin")

_SAFE = ("GET", "HEAD")


def segments(path: str) -> list[str]:
    return [unquote(p) for p in path.strip("/").split("/")]


def json_response(status: int, data: Any, headers: list[tuple[str, str]] | None = None
                  ) -> Response:
    return Response(status, msgspec.json.encode(data) + b"\n", "application/json",
                    headers or [])


def domain_name(raw: str) -> str:
    """A path's domain in normal form; the registry's words when it is not a name."""
    try:
        return names.normalize(raw)
    except InvalidName as exc:
        raise HttpError(400, str(exc)) from None


class AdminApp:
    """One admin listener's request handling; lives on the supervisor's event loop."""

    def __init__(self, auth: Auth, registry: Callable[[], Registry], reload: Reload, *,
                 secure: bool, clock: Callable[[], float] = time.time) -> None:
        self.auth = auth
        self.registry = registry
        self.reload = reload
        self.dashboard = Dashboard(auth, registry, reload, secure=secure, clock=clock)

    async def handle(self, request: Request) -> Response:
        nonce = secrets.token_urlsafe(12)
        api = request.path == "/api" or request.path.startswith("/api/")
        try:
            if api:
                response = await self._api(request)
            else:
                response = await self.dashboard.route(request, nonce)
        except HttpError as exc:
            response = (self._api_error(exc) if api
                        else self.dashboard.error_page(exc, nonce, request))
        except (RegistryError, BundleError) as exc:
            failure = HttpError(400, str(exc))
            response = (self._api_error(failure) if api
                        else self.dashboard.error_page(failure, nonce, request))
        except StoreError as exc:
            log.error("admin: store error: %s", exc)
            failure = HttpError(503, f"the store is unavailable: {exc}")
            response = (self._api_error(failure) if api
                        else self.dashboard.error_page(failure, nonce, request))
        return secured(response, nonce)

    @staticmethod
    def _api_error(exc: HttpError) -> Response:
        headers = list(exc.headers)
        if exc.status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="tlsedge-admin"'))
        return json_response(exc.status, {"error": exc.message}, headers)

    async def _api(self, request: Request) -> Response:
        session = self.auth.authenticate(request)
        if request.method not in _SAFE:
            check_csrf_header(session, request)
        try:
            return await self._api_route(request, segments(request.path))
        except (RegistryError, BundleError) as exc:
            return json_response(400, {"error": str(exc)})

    async def _api_route(self, request: Request, parts: list[str]) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        registry = self.registry()
        match parts, method:
            case ["api", "v1", "domains"], "GET":
                views = await registry.views()
                return json_response(200, {"domains": [v.to_json() for v in views],
                                           "now": time.time()})
            case ["api", "v1", "domains"], "POST":
                return await self._add(registry, request)
            case ["api", "v1", "domains", raw], "GET":
                name = await self._existing(registry, raw)
                return json_response(200, (await registry.view(name)).to_json())
            case ["api", "v1", "domains", raw], "DELETE":
                name = await self._existing(registry, raw)
                await registry.remove_domain(name)
                log.info("admin: domain %s removed", name)
                return json_response(200, {"removed": name})
            case ["api", "v1", "domains", raw, "certificate"], "PUT" | "POST":
                name = await self._existing(registry, raw)
                chain, key = forms.uploaded_pair(request)
                view = await registry.set_custom_certificate(name, chain, key)
                log.info("admin: custom certificate of %s uploaded", name)
                return json_response(200, view.to_json())
            case ["api", "v1", "domains", raw, "certificate"], "DELETE":
                name = await self._existing(registry, raw)
                view = await registry.remove_custom_certificate(name)
                log.info("admin: custom certificate of %s removed", name)
                return json_response(200, view.to_json())
            case ["api", "v1", "reload"], "POST":
                refused = self.reload()
                if refused is not None:
                    return json_response(409, {"error": f"reload refused: {refused}"})
                return json_response(200, {"reloaded": True})
            case (["api", "v1", "domains"] | ["api", "v1", "domains", _]
                  | ["api", "v1", "domains", _, "certificate"] | ["api", "v1", "reload"]), _:
                raise HttpError(405, f"{request.method} is not allowed on {request.path}")
        raise HttpError(404, f"no such API endpoint: {request.path}")

    @staticmethod
    async def _existing(registry: Registry, raw: str) -> str:
        name = domain_name(raw)
        if await registry.domain(name) is None:
            raise HttpError(404, f"domain {name} does not exist")
        return name

    @staticmethod
    async def _add(registry: Registry, request: Request) -> Response:
        body: forms.AddDomain = forms.json_body(request, forms.AddDomain)
        name = domain_name(body.name)
        if await registry.domain(name) is not None:
            raise HttpError(409, f"domain {name} already exists")
        pem = body.certificate is not None or body.key is not None
        view = await registry.add_domain(
            name, body.app, letsencrypt=body.letsencrypt,
            chain=(body.certificate or "").encode() if pem else None,
            key=(body.key or "").encode() if pem else None)
        log.info("admin: domain %s added to %s", name, body.app)
        return json_response(201, view.to_json())


def check_csrf_header(session: Session | None, request: Request) -> None:
    """A cookie-authenticated change must carry the session's CSRF token in a header;
    a bearer token cannot be attached by another site, so it needs none."""
    if session is not None and not session.csrf_ok(request.header("x-csrf-token")):
        raise HttpError(403, "missing or wrong X-CSRF-Token header")


_CSP = ("default-src 'none'; style-src 'nonce-{n}'; script-src 'nonce-{n}'; "
        "connect-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'")


def secured(response: Response, nonce: str) -> Response:
    """The headers every admin answer carries: no caching, no framing, no sniffing."""
    response.headers += [("Cache-Control", "no-store"),
                         ("X-Content-Type-Options", "nosniff"),
                         ("X-Frame-Options", "DENY"),
                         ("Referrer-Policy", "no-referrer")]
    if response.content_type.startswith("text/html"):
        response.headers.append(("Content-Security-Policy", _CSP.format(n=nonce)))
    return response
