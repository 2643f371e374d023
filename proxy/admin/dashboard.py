"""The dashboard's routes: log in and out, the domains table, one domain's page and its
forms (add, upload a custom certificate, retry Let's Encrypt now, remove), each form
checked against the session's CSRF token before anything changes; and this node's
order queue (the orders the CA's rate limits hold back, with why and until when).

Rules and error words come from proxy.registry (the CLI's); the HTML from pages.py
(jinja2 templates); bodies from bodies.py.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from urllib.parse import quote, unquote

from aiohttp import web

from proxy import listing, names
from proxy.admin import bodies, pages
from proxy.admin.auth import LOGIN_COOKIE, SESSION_COOKIE, Auth, Session, client_address
from proxy.admin.httperror import HttpError
from proxy.errors import BundleError, InvalidName, RegistryError
from proxy.registry import Registry, UnknownDomain

log = logging.getLogger("tlsedge.admin")

# The supervisor's reload: None when accepted, else why it was refused.
Reload = Callable[[], str | None]
# This node's waiting orders, most urgent first: (domain, why, until when) — the
# lifecycle's order budget (Budget.queue), handed over by the supervisor.
OrderQueue = Callable[[], Sequence[tuple[str, str, float]]]
QUEUE_PAGE = 100  # rows per page of the order queue

# Messages after a successful form, picked by a fixed key (nothing is echoed back).
DONE = {
    "added": "Domain added. Let's Encrypt starts once its DNS points at this platform.",
    "certificate": "Custom certificate validated: it is now in use.",
    "certificate-removed": "Custom certificate removed; Let's Encrypt takes over.",
    "removed": "Domain removed.",
    "retried": "Retry requested: Let's Encrypt is asked again now.",
    "reloaded": "Configuration and platform certificates reloaded.",
}


def html_response(status: int, body: str, headers: list[tuple[str, str]] | None = None
                  ) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/html",
                        headers=headers or [])


def redirect(location: str) -> web.Response:
    return web.Response(status=303, text="", headers={"Location": location})


def domain_path(name: str) -> str:
    return "/domains/" + quote(name, safe="")


class Dashboard:
    """Server-rendered pages behind the session cookie (or a bearer token)."""

    def __init__(self, auth: Auth, registry: Callable[[], Registry], reload: Reload, *,
                 secure: bool, clock: Callable[[], float] = time.time,
                 queue: OrderQueue | None = None) -> None:
        self.auth = auth
        self.registry = registry
        self.reload = reload
        self.secure = secure
        self.clock = clock
        self.queue = queue  # None: this node orders no certificate (no acme: section)

    def cookie(self, response: web.Response, name: str, value: str, *, max_age: int,
               path: str = "/") -> web.Response:
        """Set a cookie only this origin's pages send back (Secure over TLS)."""
        response.set_cookie(name, value, max_age=max_age, path=path, httponly=True,
                            samesite="Strict", secure=self.secure)
        return response

    async def route(self, request: web.Request, nonce: str) -> web.Response:
        parts = [unquote(p) for p in request.rel_url.raw_path.strip("/").split("/")]
        method = "GET" if request.method == "HEAD" else request.method
        if parts == ["login"] and method == "GET":
            return self._login_form(request, nonce)
        if parts == ["login"] and method == "POST":
            return await self._login(request, nonce)
        if parts == ["favicon.ico"]:
            raise HttpError(404, "no icon")
        session = self.auth.authenticate(request)
        csrf = session.csrf if session is not None else ""
        registry = self.registry()
        match parts, method:
            case [""], "GET":
                return redirect("/domains")
            case ["domains"], "GET":
                query = listing.Query.parse({k: v for k, v in request.query.items()
                                             if k != "done"})
                return await self._domains(registry, nonce, csrf, query=query,
                                           ok=DONE.get(request.query.get("done", "")))
            case ["domains"], "POST":
                return await self._add(registry, request, session, nonce)
            case ["domains", raw], "GET":
                name = await self._existing(registry, raw)
                return html_response(200, pages.domain_page(
                    await registry.view(name), nonce=nonce, csrf=csrf, now=self.clock(),
                    ok=DONE.get(request.query.get("done", "")), queued=self._place(name)))
            case ["queue"], "GET":
                return self._queue_page(request.query.get("page", "1"), nonce, csrf)
            case ["domains", raw, "certificate"], "POST":
                name = await self._existing(registry, raw)
                return await self._upload(registry, request, session, name, nonce)
            case (["domains", raw, "certificate" as action, "delete"]
                  | ["domains", raw, ("retry" | "delete") as action]), "POST":
                name = await self._existing(registry, raw)
                self._form_csrf(session, await bodies.form_fields(request))
                return await self._change(registry, name, action)
            case ["reload"], "POST":
                self._form_csrf(session, await bodies.form_fields(request))
                refused = self.reload()
                if refused is not None:
                    return await self._domains(registry, nonce, csrf,
                                               error=f"reload refused: {refused}", status=409)
                return redirect("/domains?done=reloaded")
            case ["logout"], "POST":
                self._form_csrf(session, await bodies.form_fields(request))
                if session is not None:
                    self.auth.sessions.drop(session.id)
                return self.cookie(redirect("/login"), SESSION_COOKIE, "", max_age=0)
        raise HttpError(404, f"no page at {request.path}")

    @staticmethod
    async def _change(registry: Registry, name: str, action: str) -> web.Response:
        """A button of the domain page (CSRF checked): remove the custom certificate,
        retry Let's Encrypt now, or remove the domain."""
        if action == "certificate":
            await registry.remove_custom_certificate(name)
            log.info("admin: custom certificate of %s removed", name)
            return redirect(domain_path(name) + "?done=certificate-removed")
        if action == "retry":
            await registry.retry(name)
            log.info("admin: retry of %s requested", name)
            return redirect(domain_path(name) + "?done=retried")
        await registry.remove_domain(name)
        log.info("admin: domain %s removed", name)
        return redirect("/domains?done=removed")

    @staticmethod
    def _form_csrf(session: Session | None, fields: dict[str, str]) -> None:
        if session is not None and not session.csrf_ok(fields.get("csrf", "")):
            raise HttpError(403, "the form's CSRF token is missing or wrong; reload the page "
                            "and try again")

    @staticmethod
    async def _existing(registry: Registry, raw: str) -> str:
        try:
            name = names.normalize(raw, allow_wildcard=True)  # `*.shop.example.com` too
        except InvalidName as exc:
            raise HttpError(404, str(exc)) from None
        try:  # a config file's domain has a page too (its changes are refused, 409)
            await registry.require(name)
        except UnknownDomain as exc:
            raise HttpError(404, str(exc)) from None
        return name

    async def _domains(self, registry: Registry, nonce: str, csrf: str, *,
                       error: str | None = None, ok: str | None = None,
                       status: int = 200, query: listing.Query | None = None
                       ) -> web.Response:
        """One page of the domains (listing.py: a search by name prefix and a status
        filter, a link to the next page), with the node's counts by status."""
        query = query or listing.Query()
        found = await listing.page(registry, query)
        counts = registry.index.status_counts() if registry.index is not None else None
        body = pages.domains_page(found.views, await registry.apps(), nonce=nonce,
                                  csrf=csrf, now=self.clock(), error=error, ok=ok,
                                  query=query, next_after=found.next, counts=counts,
                                  queued=None if self.queue is None else len(self.queue()))
        return html_response(status, body)

    def _queue_page(self, raw_page: str, nonce: str, csrf: str) -> web.Response:
        """One page (QUEUE_PAGE rows) of this node's order queue, most urgent first."""
        page = int(raw_page) if raw_page.isdigit() and len(raw_page) < 10 else 0
        if page < 1:
            raise HttpError(400, f"page must be a whole number from 1, not {raw_page[:20]!r}")
        rows = self.queue() if self.queue is not None else ()
        start = (page - 1) * QUEUE_PAGE
        return html_response(200, pages.queue_page(
            rows[start:start + QUEUE_PAGE], first=start + 1, total=len(rows),
            prev_url=f"/queue?page={page - 1}" if page > 1 else None,
            next_url=f"/queue?page={page + 1}" if start + QUEUE_PAGE < len(rows) else None,
            acme_on=self.queue is not None, nonce=nonce, csrf=csrf, now=self.clock()))

    def _place(self, name: str) -> pages.QueuePlace | None:
        """Where `name`'s order waits in this node's queue (None: it does not wait)."""
        rows = self.queue() if self.queue is not None else ()
        for position, (queued, why, until) in enumerate(rows, 1):
            if queued == name:
                return pages.QueuePlace(position, len(rows), why, until)
        return None

    async def _add(self, registry: Registry, request: web.Request, session: Session | None,
                   nonce: str) -> web.Response:
        fields = await bodies.form_fields(request)
        self._form_csrf(session, fields)
        try:
            view = await registry.add_domain(fields.get("name", ""), fields.get("app", ""))
        except (RegistryError, BundleError) as exc:
            return await self._domains(registry, nonce, session.csrf if session else "",
                                       error=str(exc), status=400)
        log.info("admin: domain %s added to %s", view.name, view.app)
        return redirect(domain_path(view.name) + "?done=added")

    async def _upload(self, registry: Registry, request: web.Request,
                      session: Session | None, name: str, nonce: str) -> web.Response:
        """Validate and store an uploaded pair; errors are shown next to the form, in the
        registry's words (the same the CLI prints)."""
        try:
            parts = await bodies.multipart(request)
            csrf = parts.get("csrf")
            self._form_csrf(session, {"csrf": csrf.data.decode("utf-8", "replace")}
                            if csrf is not None else {})
            chain, key = bodies.pem_pair(parts)
            await registry.set_custom_certificate(name, chain, key)
        except (RegistryError, BundleError) as exc:
            error, status = str(exc), 400
        except HttpError as exc:
            if exc.status in (401, 403, 429):
                raise
            error, status = exc.message, exc.status
        else:
            log.info("admin: custom certificate of %s uploaded", name)
            return redirect(domain_path(name) + "?done=certificate")
        body = pages.domain_page(await registry.view(name), nonce=nonce,
                                 csrf=session.csrf if session else "", now=self.clock(),
                                 error=error)
        return html_response(status, body)

    # -- login ------------------------------------------------------------------------
    def _login_form(self, request: web.Request, nonce: str, *, error: str | None = None,
                    status: int = 200) -> web.Response:
        if status == 200 and self.auth.sessions.get(request.cookies.get(SESSION_COOKIE, "")):
            return redirect("/domains")
        # Double-submit token: the form and a cookie only this origin can set must agree.
        login_csrf = secrets.token_urlsafe(24)
        page = html_response(status, pages.login_page(nonce=nonce, login_csrf=login_csrf,
                                                      error=error))
        return self.cookie(page, LOGIN_COOKIE, login_csrf, max_age=3600, path="/login")

    async def _login(self, request: web.Request, nonce: str) -> web.Response:
        fields = await bodies.form_fields(request)
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not secrets.compare_digest(fields.get("csrf", ""), expected):
            return self._login_form(request, nonce, status=403,
                                    error="The login form expired; try again.")
        client = client_address(request)
        try:
            self.auth.check_token(client, fields.get("token", "").strip())
        except HttpError as exc:
            if exc.status != 401:
                raise
            return self._login_form(request, nonce, status=401, error="Wrong admin token.")
        session = self.auth.sessions.create()
        log.info("admin: dashboard login from %s", client)
        response = self.cookie(redirect("/domains"), SESSION_COOKIE, session.id,
                               max_age=int(self.auth.sessions.ttl))
        return self.cookie(response, LOGIN_COOKIE, "", max_age=0, path="/login")

    def error_page(self, exc: HttpError, nonce: str, request: web.Request) -> web.Response:
        if exc.status == 401 and request.method in ("GET", "HEAD"):
            return redirect("/login")
        if exc.status == 429 and request.path == "/login":
            return html_response(429, pages.login_page(
                nonce=nonce, login_csrf="", error=exc.message[0].upper() + exc.message[1:]
                + "."), exc.headers)
        titles = {401: "Log in first", 403: "Refused", 404: "Not found", 429: "Slow down"}
        title = titles.get(exc.status, "Request refused")
        return html_response(exc.status, pages.message_page(title, exc.message, nonce=nonce),
                             exc.headers)
