"""Routes of the admin listener: the JSON API under /api/v1, and the entry point (the
aiohttp handler of every request) that refuses oversized bodies before reading them,
sends everything else to the dashboard, and adds the security headers every answer gets.

Every change goes through proxy.registry.Registry, so the API applies exactly the
rules (and words) of the CLI; this module only translates HTTP to registry calls.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

import msgspec
from aiohttp import web

from proxy import listing, names
from proxy.admin import bodies
from proxy.admin.auth import Auth, Session
from proxy.admin.dashboard import Dashboard, OrderQueue, Reload
from proxy.admin.httperror import HttpError
from proxy.errors import BundleError, InvalidName, RegistryError, StoreError
from proxy.registry import ConfigDomain, Registry, UnknownDomain

log = logging.getLogger("tlsedge.admin")

_SAFE = ("GET", "HEAD")
# Refusals after which the rest of the body is not worth reading: the connection closes.
_CLOSE = frozenset({408, 411, 413})


def segments(request: web.BaseRequest) -> list[str]:
    """The path's segments, each percent-decoded on its own (a %2F stays inside one)."""
    return [unquote(p) for p in request.rel_url.raw_path.strip("/").split("/")]


def json_response(status: int, data: Any, headers: list[tuple[str, str]] | None = None
                  ) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(data) + b"\n",
                        content_type="application/json", headers=headers or [])


def _whole(query: Mapping[str, str], key: str, default: int, low: int,
           high: int | None = None) -> int:
    """A whole-number query parameter within [low, high]; 400 with the bounds if not."""
    raw = query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"from {low}"
        raise HttpError(400, f"{key} must be a whole number {bounds}")
    return value


def domain_name(raw: str) -> str:
    """A path's domain in normal form; the registry's words when it is not a name."""
    try:
        return names.normalize(raw, allow_wildcard=True)  # `*.shop.example.com` too
    except InvalidName as exc:
        raise HttpError(400, str(exc)) from None


class AdminApp:
    """One admin listener's request handling; lives on the supervisor's event loop."""

    def __init__(self, auth: Auth, registry: Callable[[], Registry], reload: Reload, *,
                 secure: bool, clock: Callable[[], float] = time.time,
                 queue: OrderQueue | None = None) -> None:
        self.auth = auth
        self.registry = registry
        self.reload = reload
        self.queue = queue
        self.dashboard = Dashboard(auth, registry, reload, secure=secure, clock=clock,
                                   queue=queue)

    async def handle(self, request: web.Request) -> web.Response:
        """The answer to any request on the admin listener (aiohttp's only handler)."""
        nonce = secrets.token_urlsafe(12)
        path = request.rel_url.raw_path
        api = path == "/api" or path.startswith("/api/")
        try:
            response = await self._route(request, nonce, api=api)
        except ConnectionError:
            raise  # the client went away: aiohttp drops the connection
        except Exception:
            log.exception("admin: %s %s failed", request.method, path)
            response = web.Response(status=500, text="internal error; see the tlsedge log\n")
            response.force_close()
        return secured(response, nonce)

    async def _route(self, request: web.Request, nonce: str, *, api: bool) -> web.Response:
        failure: HttpError
        try:
            bodies.check_length(request)  # before a byte of the body is read
            if api:
                return await self._api(request)
            return await self.dashboard.route(request, nonce)
        except HttpError as exc:
            failure = exc
        except ConfigDomain as exc:  # a dashboard button on a config file's domain
            failure = HttpError(409, str(exc))
        except (RegistryError, BundleError) as exc:
            failure = HttpError(400, str(exc))
        except StoreError as exc:
            log.error("admin: store error: %s", exc)
            failure = HttpError(503, f"the store is unavailable: {exc}")
        response = (self._api_error(failure) if api
                    else self.dashboard.error_page(failure, nonce, request))
        if failure.status in _CLOSE:
            response.force_close()
        return response

    @staticmethod
    def _api_error(exc: HttpError) -> web.Response:
        headers = list(exc.headers)
        if exc.status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="tlsedge-admin"'))
        return json_response(exc.status, {"error": exc.message}, headers)

    async def _api(self, request: web.Request) -> web.Response:
        session = self.auth.authenticate(request)
        if request.method not in _SAFE:
            check_csrf_header(session, request)
        try:
            return await self._api_route(request, segments(request))
        except ConfigDomain as exc:
            return json_response(409, {"error": str(exc)})
        except (RegistryError, BundleError) as exc:
            return json_response(400, {"error": str(exc)})

    async def _api_route(self, request: web.Request, parts: list[str]) -> web.Response:
        method = "GET" if request.method == "HEAD" else request.method
        registry = self.registry()
        match parts, method:
            case ["api", "v1", "domains"], "GET":
                found = await listing.page(registry, listing.Query.parse(request.query))
                page: dict[str, Any] = {"domains": [v.to_json() for v in found.views],
                                        "next": found.next, "now": time.time()}
                if registry.index is not None:  # counts kept by the node, not a scan
                    page["counts"] = registry.index.status_counts()
                return json_response(200, page)
            case ["api", "v1", "domains"], "POST":
                return await self._add(registry, request)
            case ["api", "v1", "domains", raw], "GET":
                name = await self._existing(registry, raw)
                return json_response(200, (await registry.view(name)).to_json())
            case ["api", "v1", "domains", raw], "DELETE":
                name = await self._existing(registry, raw, change=True)
                await registry.remove_domain(name)
                log.info("admin: domain %s removed", name)
                return json_response(200, {"removed": name})
            case ["api", "v1", "domains", raw, "certificate"], "PUT" | "POST":
                name = await self._existing(registry, raw, change=True)
                chain, key = await bodies.uploaded_pair(request)
                view = await registry.set_custom_certificate(name, chain, key)
                log.info("admin: custom certificate of %s uploaded", name)
                return json_response(200, view.to_json())
            case ["api", "v1", "domains", raw, "certificate"], "DELETE":
                name = await self._existing(registry, raw, change=True)
                view = await registry.remove_custom_certificate(name)
                log.info("admin: custom certificate of %s removed", name)
                return json_response(200, view.to_json())
            case ["api", "v1", "domains", raw, "retry"], "POST":
                name = await self._existing(registry, raw, change=True)
                view = await registry.retry(name)
                log.info("admin: retry of %s requested", name)
                return json_response(202, view.to_json())
            case ["api", "v1", "apps", app], "GET":
                return json_response(200, await registry.app_settings(
                    await self._existing_app(registry, app)))
            case ["api", "v1", "apps", app], "PUT" | "PATCH":
                await self._existing_app(registry, app)
                body: bodies.AppSettings = await bodies.json_body(request, bodies.AppSettings)
                settings = await registry.set_force_https(app, body.force_https)
                log.info("admin: app %s force_https %s", app, body.force_https)
                return json_response(200, settings)
            case ["api", "v1", "queue"], "GET":
                return json_response(200, self._queue_page(request.query))
            case ["api", "v1", "reload"], "POST":
                refused = self.reload()
                if refused is not None:
                    return json_response(409, {"error": f"reload refused: {refused}"})
                return json_response(200, {"reloaded": True})
            case (["api", "v1", "domains"] | ["api", "v1", "domains", _]
                  | ["api", "v1", "domains", _, "certificate"]
                  | ["api", "v1", "domains", _, "retry"] | ["api", "v1", "reload"]
                  | ["api", "v1", "queue"]
                  | ["api", "v1", "apps", _]), _:
                raise HttpError(405, f"{request.method} is not allowed on {request.path}")
        raise HttpError(404, f"no such API endpoint: {request.path}")

    def _queue_page(self, query: Mapping[str, str]) -> dict[str, Any]:
        """This node's waiting orders, most urgent first: `limit` (1-1000, default 100)
        from `offset`; `acme: false` on a node that orders no certificate."""
        limit, offset = _whole(query, "limit", 100, 1, 1000), _whole(query, "offset", 0, 0)
        rows = self.queue() if self.queue is not None else ()
        return {"acme": self.queue is not None, "waiting": len(rows),
                "orders": [{"domain": name, "reason": why, "until": until}
                           for name, why, until in rows[offset:offset + limit]]}

    @staticmethod
    async def _existing_app(registry: Registry, app: str) -> str:
        if app not in await registry.apps():
            raise HttpError(404, f"app {app} does not exist")
        return app

    @staticmethod
    async def _existing(registry: Registry, raw: str, *, change: bool = False) -> str:
        """The path's domain: 404 when there is none; 409 for a change to one of the
        config file's (read-only here: GET answers its view, marked source config)."""
        name = domain_name(raw)
        try:
            await registry.require(name, change=change)
        except UnknownDomain as exc:
            raise HttpError(404, str(exc)) from None
        except ConfigDomain as exc:
            raise HttpError(409, str(exc)) from None
        return name

    @staticmethod
    async def _add(registry: Registry, request: web.Request) -> web.Response:
        raw: dict[str, Any] = await bodies.json_body(request, dict[str, Any])
        if "names" in raw:  # a bulk add: one result per name
            many: bodies.AddDomains = _convert(raw, bodies.AddDomains)
            results = await registry.add_domains(many.names, many.app,
                                                 letsencrypt=many.letsencrypt)
            added = sum(r.view is not None for r in results)
            log.info("admin: %d domains added to %s, %d rejected", added, many.app,
                     len(results) - added)
            return json_response(200, {"results": [r.to_json() for r in results],
                                       "added": added, "rejected": len(results) - added})
        body: bodies.AddDomain = _convert(raw, bodies.AddDomain)
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


def _convert(raw: dict[str, Any], kind: type[Any]) -> Any:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise HttpError(400, f"invalid JSON body: {exc}") from None


def check_csrf_header(session: Session | None, request: web.BaseRequest) -> None:
    """A cookie-authenticated change must carry the session's CSRF token in a header;
    a bearer token cannot be attached by another site, so it needs none."""
    if session is not None and not session.csrf_ok(request.headers.get("X-CSRF-Token", "")):
        raise HttpError(403, "missing or wrong X-CSRF-Token header")


_CSP = ("default-src 'none'; style-src 'nonce-{n}'; script-src 'nonce-{n}'; "
        "connect-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'")


def secured(response: web.Response, nonce: str) -> web.Response:
    """The headers every admin answer carries: no caching, no framing, no sniffing,
    and no software version."""
    response.headers.update({"Cache-Control": "no-store",
                             "X-Content-Type-Options": "nosniff",
                             "X-Frame-Options": "DENY",
                             "Referrer-Policy": "no-referrer",
                             "Server": "tlsedge"})
    if response.content_type == "text/html":
        response.headers["Content-Security-Policy"] = _CSP.format(n=nonce)
    return response
