"""The ACME client of the lifecycle: accounts, HTTP-01 and DNS-01 orders, ARI windows.

Certbot's synchronous `acme` package runs here on a thread pool this module owns; the
public API is async and never blocks the event loop. It never logs or stores a private
key (the caller persists `Account` and `Issued`) and never touches the data plane.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime
import email.utils
import functools
import logging
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import josepy.errors
import requests
from acme import challenges, messages
from acme import errors as acme_errors
from acme.client import ClientNetwork, ClientV2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy import json_util, jwa, jwk

from proxy.certs.csr import csr_pem, new_key, private_key_pem
from proxy.errors import IssuanceError

__all__ = ["PERMANENT_PROBLEMS", "Account", "AccountUnknown", "AcmeClient",
           "AcmeSettings", "AuthorizationFailed", "ChallengePublisher", "Dns01Publisher",
           "Issued", "IssuerUnavailable", "RateLimited", "RenewalInfo", "ari_cert_id"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_USER_AGENT = "tlsedge"
_NETWORK_TIMEOUT = 30  # seconds per HTTP request to the CA
_BADNONCE_ROUNDS = 5  # each round is acme's own try + one retry: up to 10 sends
_CALLBACK_TIMEOUT = 30.0  # publish/withdraw on the caller's loop (may write to etcd)
_CALLBACK_SLICE = 0.05  # how often a waiting flow looks whether it was cancelled
_MAX_POLL_INTERVAL = 2.0  # polling backs off towards this, so a real CA is not hammered

PERMANENT_PROBLEMS = frozenset({
    # The request itself is wrong: sending it again gives the same answer.
    "malformed", "rejectedIdentifier", "unsupportedIdentifier", "badCSR",
    "badSignatureAlgorithm", "badPublicKey", "invalidContact", "unsupportedContact",
    # Needs a person: the domain's CAA records, the CA's terms, an EAB key.
    "caa", "userActionRequired", "externalAccountRequired",
})
"""ACME problem types (without the urn prefix) not worth retrying soon.

Everything else is retryable with backoff, deliberately including the validation
failures (unauthorized, incorrectResponse, dns, connection, tls, unknownHost): for a
PaaS they mostly mean DNS not yet propagated or the customer still moving the domain,
which fixes itself without anyone telling us. rateLimited is retryable with
retry_after; accountDoesNotExist means "register an account again", then retry
(AccountUnknown).
"""

_ENVIRONMENT_MATTERS = bool(urllib.request.getproxies()) or any(
    os.environ.get(v) for v in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NETRC"))

_RATE_LIMIT_UNTIL = re.compile(r"retry after (\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d)(?:Z| UTC)?",
                               re.IGNORECASE)


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class AcmeSettings:
    """Where and how to order. `ca_bundle` is a PEM file trusted for the CA's own HTTPS."""

    directory: str
    email: str = ""
    ca_bundle: str | None = None
    key_type: Literal["ecdsa", "rsa"] = "ecdsa"
    poll_interval: float = 0.05
    order_timeout: float = 90.0
    # External Account Binding (RFC 8555 7.3.4) for CAs that require it: the key id and
    # the base64url HMAC key the CA gave (a secret: never shown).
    eab_kid: str = ""
    eab_hmac_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class Account:
    """A registered ACME account as the caller persists it (key_pem is a secret: 0600)."""

    directory: str
    uri: str
    key_pem: str
    email: str

    def __repr__(self) -> str:
        # Keep the key out of tracebacks and log lines that format the object.
        return f"Account(directory={self.directory!r}, uri={self.uri!r}, email={self.email!r})"


class ChallengePublisher(Protocol):
    """Makes an HTTP-01 token answerable by the port-80 listener of every worker.

    `publish` must return only once any worker would answer the token: the CA may
    connect the moment the challenge is answered. Both are called on the loop that
    awaited `AcmeClient.order`.
    """

    async def publish(self, token: str, key_authorization: str) -> None: ...

    async def withdraw(self, token: str) -> None: ...


class Dns01Publisher(Protocol):
    """Puts a DNS-01 TXT value where the CA looks for `identifier` (lifecycle/dns01.py).

    `publish_txt` returns once the zone's authoritative servers all answer the value
    (at most `timeout` seconds); other values at the same name stay (a wildcard and
    its apex are validated at once). Both run on the loop that awaited the order.
    """

    timeout: float

    async def publish_txt(self, identifier: str, value: str) -> None: ...

    async def withdraw_txt(self, identifier: str, value: str) -> None: ...


_Undo = Callable[[], Coroutine[Any, Any, None]]  # withdraws one published challenge


@dataclass(frozen=True)
class Issued:
    """A new certificate: fullchain PEM (leaf first) and its key (PKCS8 PEM, unencrypted)."""

    chain_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return f"Issued(chain_pem=<{len(self.chain_pem)} bytes>, key_pem=<hidden>)"


class AccountUnknown(IssuanceError):
    """The CA refused the request because of the account itself: it no longer knows it
    (accountDoesNotExist: a CA database reset, a pebble restart) or no longer accepts it
    (unauthorized, naming the account: deactivated). Registering a new account and
    sending the request again is the cure; nothing else is."""


class RateLimited(IssuanceError):
    """The CA refused for a rate limit (429, rateLimited) until `retry_after`: the
    account's (`account`) or the names' (a registered domain, a name set)."""

    def __init__(self, message: str, *, retry_after: float | None, account: bool) -> None:
        super().__init__(message, retry_after=retry_after)
        self.account = account


class IssuerUnavailable(IssuanceError):
    """The CA took no request: unreachable (`status` 0) or answering HTTP `status` 5xx
    (a 503 asks for a pause until `retry_after`). Another CA may serve meanwhile."""

    def __init__(self, message: str, *, status: int = 0,
                 retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status = status


class AuthorizationFailed(IssuanceError):
    """The order became invalid: the CA could not validate its names (each counts as a
    failed authorization toward the CA's limits)."""


@dataclass(frozen=True)
class RenewalInfo:
    """The CA's renewal information for one certificate (RFC 9773): the suggested
    window as unix times, and the seconds its Retry-After asks us to wait before asking
    again (None: the CA did not say)."""

    window: tuple[float, float]
    retry_after: float | None


# --------------------------------------------------------------------------- network


class _PatientNetwork(ClientNetwork):
    """ClientNetwork that survives runs of badNonce and remembers the last Retry-After.

    acme retries a badNonce once; pebble rejects 5 % of nonces, so two in a row happen
    about once in 400 POSTs. A request refused for badNonce was not processed (RFC 8555
    6.5), so sending it again is safe. One instance per worker thread (AcmeClient.network):
    nonces and the requests.Session are not shared between threads.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after: str | None = None
        self.status = 0  # of the last answer: a problem document does not carry it

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for _ in range(_BADNONCE_ROUNDS - 1):
            try:
                return super().post(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce":
                    raise
        return super().post(*args, **kwargs)

    def _send_request(self, method: str, url: str, *args: Any,
                      **kwargs: Any) -> requests.Response:
        response = super()._send_request(method, url, *args, **kwargs)
        # messages.Error does not carry the response: keep the header for the error path.
        self.retry_after = response.headers.get("Retry-After")
        self.status = response.status_code
        return response


def _retry_after_seconds(header: str | None, problem: messages.Error | None) -> float | None:
    """Seconds to wait from a Retry-After header, else from a rateLimited problem's text."""
    now = time.time()
    if header:
        header = header.strip()
        if header.isdigit():
            return float(header)
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=datetime.UTC)
            return max(0.0, when.timestamp() - now)
    if problem is not None and _problem_code(problem) == "rateLimited" and problem.detail:
        match = _RATE_LIMIT_UNTIL.search(problem.detail)
        if match:
            until = datetime.datetime.fromisoformat(match.group(1).replace(" ", "T"))
            return max(0.0, until.replace(tzinfo=datetime.UTC).timestamp() - now)
    return None


def _problem_code(problem: messages.Error) -> str:
    """The problem type without the ACME urn prefix (also for types acme does not know)."""
    return str(problem.typ).removeprefix(messages.ERROR_PREFIX)


def _problem_text(problem: messages.Error) -> str:
    """One line: 'urn:ietf:params:acme:error:TYPE: detail' (+ subproblems)."""
    text = f"{problem.typ}: {problem.detail or problem.title or problem.description or ''}"
    for sub in problem.subproblems or ():
        who = f" ({sub.identifier.value})" if sub.identifier else ""
        text += f"; {sub.typ}{who}: {sub.detail or ''}"
    return " ".join(text.split())


def _is_permanent(problem: messages.Error) -> bool:
    if _problem_code(problem) == "compound" and problem.subproblems:
        return all(_is_permanent(sub) for sub in problem.subproblems)
    return _problem_code(problem) in PERMANENT_PROBLEMS


def _account_problem(problem: messages.Error) -> bool:
    """Whether a problem answered to a request (not an order's validation result) is
    about the account: `unauthorized` also reports failed challenges, so it counts only
    when its text names the account."""
    code = _problem_code(problem)
    return code == "accountDoesNotExist" or (
        code == "unauthorized" and "account" in (problem.detail or "").lower())


def _problem_error(prefix: str, problem: messages.Error, header: str | None,
                   kind: type[IssuanceError] = IssuanceError) -> IssuanceError:
    text = f"{prefix}{_problem_text(problem)}"
    retry_after = _retry_after_seconds(header, problem)
    if _problem_code(problem) == "rateLimited":
        return RateLimited(text, retry_after=retry_after,
                           account="account" in (problem.detail or "").lower())
    return kind(text, retry_after=retry_after, permanent=_is_permanent(problem))


# --------------------------------------------------------------------------- keys


def _account_jwk(key_pem: str) -> tuple[jwk.JWK, jwa.JWASignature]:
    """The account key as a JWK with the JWS algorithm its type requires."""
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": jwa.ES256, "secp384r1": jwa.ES384,
               "secp521r1": jwa.ES512}.get(key.curve.name)
        if alg is None:
            raise IssuanceError(f"ACME account key curve {key.curve.name} is not supported",
                                permanent=True)
        return jwk.JWKEC(key=key), alg
    if isinstance(key, rsa.RSAPrivateKey):
        return jwk.JWKRSA(key=key), jwa.RS256
    raise IssuanceError("ACME account key must be ECDSA or RSA", permanent=True)


def ari_cert_id(chain_pem: bytes) -> str | None:
    """The ARI id of a chain's leaf certificate: what an order renewing it names in
    `replaces` (RFC 9773 5), and what renewalInfo is asked for."""
    return _ari_cert_id(x509.load_pem_x509_certificate(chain_pem))


class _ReplacingOrder(messages.NewOrder):
    """A new order naming the certificate it renews (RFC 9773 5: `replaces`), which
    acme 5.9's NewOrder has no field for. A CA with ARI links the two, and Let's
    Encrypt exempts such a renewal from its new-order limits."""

    replaces: str = json_util.field("replaces", omitempty=True)


def _ari_cert_id(cert: x509.Certificate) -> str | None:
    """RFC 9773 4.1: base64url(AKI keyIdentifier) '.' base64url(DER serial), no padding."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    if aki.key_identifier is None:
        return None
    serial = cert.serial_number
    # DER INTEGER content: two's complement, so a set top bit needs a leading zero byte.
    serial_der = serial.to_bytes(serial.bit_length() // 8 + 1, "big")

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    return f"{b64(aki.key_identifier)}.{b64(serial_der)}"


# --------------------------------------------------------------------------- one flow


class _Flow:
    """One account operation or order on one worker thread, with that thread's
    ClientNetwork (AcmeClient.network).

    `cancelled` is set from the loop when the awaiting task is cancelled: waits end
    early and the flow stops at its next step (tokens are still withdrawn).
    """

    def __init__(self, owner: AcmeClient, loop: asyncio.AbstractEventLoop,
                 cancelled: threading.Event) -> None:
        self.owner = owner
        self.loop = loop
        self.cancelled = cancelled
        self.net: _PatientNetwork | None = None

    def client(self, key_pem: str, uri: str | None) -> ClientV2:
        self.net = self.owner.network(key_pem)
        client = ClientV2(self.owner.directory(self.net), self.net)
        self.net.account = (None if uri is None else
                            messages.RegistrationResource(uri=uri, body=messages.Registration()))
        return client

    @contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Turn whatever the acme/requests stack raises into one IssuanceError."""
        try:
            yield
        except IssuanceError:
            raise
        except messages.Error as problem:
            header = self.net.retry_after if self.net is not None else None
            error = _problem_error(f"{what}: ", problem, header)
            status = self.net.status if self.net is not None else 0
            if status >= 500 and not isinstance(error, RateLimited):
                raise IssuerUnavailable(str(error), status=status,
                                        retry_after=error.retry_after) from None
            if _account_problem(problem):
                raise AccountUnknown(str(error), retry_after=error.retry_after) from None
            raise error from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise IssuerUnavailable(f"ACME server unreachable: {_reason(exc)}") from None
        except requests.RequestException as exc:
            raise IssuanceError(f"{what}: request to the ACME server failed: {_reason(exc)}"
                                ) from None
        except acme_errors.ClientError as exc:
            text = f"{what}: unexpected answer from the ACME server: {_client_error_text(exc)}"
            retry_after = _retry_after_seconds(self.net.retry_after if self.net else None, None)
            status = exc.args[0].status_code if exc.args and isinstance(
                exc.args[0], requests.Response) else 0
            if status == 429:
                raise RateLimited(text, retry_after=retry_after, account=True) from None
            if status >= 500:
                raise IssuerUnavailable(text, status=status, retry_after=retry_after) from None
            raise IssuanceError(text, retry_after=retry_after) from None
        except (acme_errors.Error, josepy.errors.Error, ValueError, KeyError) as exc:
            raise IssuanceError(f"{what}: invalid answer from the ACME server: "
                                f"{type(exc).__name__}: {exc}") from None

    def call(self, coro: Coroutine[Any, Any, None], *, cancellable: bool = True,
             timeout: float = _CALLBACK_TIMEOUT) -> None:
        """Run a publisher coroutine on the caller's loop and wait for it.

        Waits in short slices so that a cancelled order stops waiting for a publish
        that hangs; a withdraw (cancellable=False) still gets its full time.
        """
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed: nobody is waiting for this order
            coro.close()
            raise
        deadline = time.monotonic() + timeout
        while True:
            try:
                future.result(_CALLBACK_SLICE)
                return
            except concurrent.futures.TimeoutError:
                if cancellable and self.cancelled.is_set():
                    future.cancel()
                    raise IssuanceError("order cancelled") from None
                if time.monotonic() >= deadline:
                    future.cancel()
                    raise

    def wait(self, seconds: float) -> None:
        if self.cancelled.wait(max(0.0, seconds)):
            raise IssuanceError("order cancelled")


def _reason(exc: BaseException) -> str:
    """The innermost cause of a requests error, e.g. '[Errno 111] Connection refused'."""
    inner: BaseException = exc
    while True:
        nxt = inner.__context__ or inner.__cause__
        if nxt is None or nxt is inner:
            break
        inner = nxt
    text = str(inner) or type(inner).__name__
    # urllib3 repeats the pool and URL around the errno; the tail says what happened.
    match = re.search(r"(\[Errno -?\d+\][^')]*)", text)
    return match.group(1).strip() if match else text


def _client_error_text(exc: acme_errors.ClientError) -> str:
    arg = exc.args[0] if exc.args else None
    if isinstance(arg, requests.Response):
        return f"HTTP {arg.status_code} {arg.reason} from {arg.url}"
    return str(exc)


# --------------------------------------------------------------------------- the client


class AcmeClient:
    """Async ACME client for one CA directory.

    Every call runs the synchronous `acme` package on this object's thread pool (at
    most `max_workers` flows at once; more wait in the pool's queue), each flow with its
    own ClientNetwork. Safe to call from several tasks of one loop at once. Errors are
    always `IssuanceError`; see PERMANENT_PROBLEMS for what `permanent` means.
    Cancelling an awaiting task stops its flow at the next step. `close()` ends the pool.
    """

    def __init__(self, settings: AcmeSettings, *, max_workers: int = 4) -> None:
        self.settings = settings
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="acme")
        self._directory: messages.Directory | None = None
        self._directory_lock = threading.Lock()
        self._local = threading.local()

    # -- plumbing

    def network(self, key_pem: str) -> _PatientNetwork:
        """This worker thread's ClientNetwork for an account key, kept for its next
        flows: its HTTPS connection and its nonces save each order a TLS handshake and
        a newNonce request. Never shared between threads (nonces, requests.Session)."""
        nets: dict[str, _PatientNetwork] = self._local.__dict__.setdefault("nets", {})
        net = nets.get(key_pem)
        if net is None:
            for old in nets.values():  # the account was replaced: its key is done with
                old.session.close()
            nets.clear()
            key, alg = _account_jwk(key_pem)
            verify: Any = self.settings.ca_bundle or True  # requests takes a path too
            net = nets[key_pem] = _PatientNetwork(
                key, alg=alg, verify_ssl=verify, user_agent=_USER_AGENT,
                timeout=_NETWORK_TIMEOUT)
            # requests reads the proxy and CA variables of the environment at every
            # request (a fifth of an order's CPU, measured): only when one is set.
            net.session.trust_env = _ENVIRONMENT_MATTERS
        net.retry_after, net.status = None, 0
        return net

    def directory(self, net: ClientNetwork) -> messages.Directory:
        """The CA's directory, fetched once (its URLs do not change while it runs)."""
        with self._directory_lock:
            if self._directory is None:
                self._directory = ClientV2.get_directory(self.settings.directory, net)
            return self._directory

    async def _run(self, fn: Callable[[_Flow], T]) -> T:
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()
        flow = _Flow(self, loop, cancelled)
        future = loop.run_in_executor(self._executor, fn, flow)
        try:
            return await future
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def close(self) -> None:
        """Stop taking work; flows already running finish on their own (not awaited)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- accounts

    async def ensure_account(self, existing: Account | None) -> Account:
        """Return a usable account: `existing` if the CA still knows it, else a new one.

        An `existing` account of another directory is ignored. If the CA forgot it (a
        pebble restart, a CA database reset) the same key is registered again, so the
        stored key stays valid; the URI may change: persist what is returned.
        """
        return await self._run(functools.partial(self._ensure_account_sync, existing))

    def _ensure_account_sync(self, existing: Account | None, flow: _Flow) -> Account:
        settings = self.settings
        if existing is not None and existing.directory == settings.directory:
            with flow.errors("ACME account lookup"):
                uri = self._lookup_account(flow, existing.key_pem)
            if uri is not None:
                return Account(settings.directory, uri, existing.key_pem, existing.email)
            log.warning("ACME account %s is unknown to %s; registering its key again",
                        existing.uri, settings.directory)
            return self._register(flow, existing.key_pem, existing.email or settings.email)
        key_pem = private_key_pem(new_key("ecdsa")).decode()
        return self._register(flow, key_pem, settings.email)

    def _lookup_account(self, flow: _Flow, key_pem: str) -> str | None:
        client = flow.client(key_pem, None)
        query = messages.NewRegistration.from_data(only_return_existing=True,
                                                   terms_of_service_agreed=True)
        try:
            regr = client.new_account(query)
        except acme_errors.ConflictError as found:  # acme's way of saying "200 + Location"
            return str(found.location)
        except messages.Error as problem:
            if _problem_code(problem) == "accountDoesNotExist":
                return None
            raise
        return str(regr.uri)

    def _register(self, flow: _Flow, key_pem: str, email_address: str) -> Account:
        try:
            with flow.errors("ACME account registration"):
                client = flow.client(key_pem, None)
                binding = None
                if self.settings.eab_kid:
                    binding = messages.ExternalAccountBinding.from_data(
                        account_public_key=_account_jwk(key_pem)[0].public_key(),
                        kid=self.settings.eab_kid, hmac_key=self.settings.eab_hmac_key,
                        directory=client.directory)
                registration = messages.NewRegistration.from_data(
                    email=email_address or None, terms_of_service_agreed=True,
                    external_account_binding=binding)
                try:
                    uri = str(client.new_account(registration).uri)
                except acme_errors.ConflictError as found:  # this key already has one
                    uri = str(found.location)
        except IssuanceError as exc:
            text = str(exc).lower()
            if not self.settings.eab_kid or not any(
                    word in text for word in ("error:unauthorized", "error:malformed",
                                              "externalaccount", "external account")):
                raise
            # A wrong kid or HMAC key: only a person with the CA's values can fix it.
            raise IssuanceError(f"{self.settings.directory} refused the External Account "
                                f"Binding (kid {self.settings.eab_kid!r}; check the issuer's "
                                f"eab.kid and eab.hmac_key_file): {exc}",
                                permanent=True) from None
        log.info("registered ACME account %s at %s", uri, self.settings.directory)
        return Account(self.settings.directory, uri, key_pem, email_address)

    # -- orders

    async def order(self, account: Account, domain: str,
                    publisher: ChallengePublisher, *, also: tuple[str, ...] = (),
                    dns: Dns01Publisher | None = None, replaces: str | None = None) -> Issued:
        """Order a certificate for `domain` (and the names `also`) with HTTP-01, or with
        DNS-01 through `dns`; return the chain and a new key. `replaces`: the ARI id
        (ari_cert_id) of the certificate an ARI-guided renewal replaces, sent with the
        order (a CA that says it was replaced already gets the order without it).

        Tokens are published through `publisher` (TXT values through `dns`) before each
        challenge is answered and withdrawn afterwards, whatever happens. Takes at most
        about settings.order_timeout seconds. IssuanceError carries the CA's problem.
        """
        return await self._run(functools.partial(self._order_sync, account, domain, publisher,
                                                 also, dns, replaces))

    def _order_sync(self, account: Account, domain: str, publisher: ChallengePublisher,
                    also: tuple[str, ...], dns: Dns01Publisher | None, replaces: str | None,
                    flow: _Flow) -> Issued:
        started = time.monotonic()
        deadline = started + self.settings.order_timeout + (dns.timeout if dns else 0.0)
        key = new_key(self.settings.key_type)
        csr = csr_pem(key, domain, also)
        published: list[_Undo] = []
        what = f"order for {domain}"
        try:
            with flow.errors(what):
                client = flow.client(account.key_pem, account.uri)
                orderr = self._new_order(client, csr, (domain, *also), replaces)
                for authzr in orderr.authorizations:
                    if dns is not None:
                        self._answer_dns01(flow, client, authzr, dns, published)
                    else:
                        self._answer(flow, client, authzr, publisher, published)
                body = self._poll(flow, client, orderr, deadline, until="ready")
                if body.status == messages.STATUS_READY:
                    client.begin_finalization(orderr)
                    body = self._poll(flow, client, orderr, deadline, until="valid")
                assert body.certificate is not None
                chain = self._post_as_get(client, body.certificate).content
        finally:
            self._withdraw(flow, published)
        log.info("issued a certificate for %s in %.2f s", domain, time.monotonic() - started)
        return Issued(chain, private_key_pem(key))

    @staticmethod
    def _new_order(client: ClientV2, csr: bytes, names: tuple[str, ...],
                   replaces: str | None) -> messages.OrderResource:
        """client.new_order, with `replaces` when given."""
        if replaces is None:
            return client.new_order(csr)
        order = _ReplacingOrder(identifiers=[
            messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n) for n in names],
            replaces=replaces)
        try:
            response = client._post(client.directory["newOrder"], order)
        except messages.Error as problem:
            if _problem_code(problem) != "alreadyReplaced":
                raise
            log.warning("the CA says certificate %s was replaced already; ordering %s "
                        "without `replaces`", replaces, names[0])
            return client.new_order(csr)
        body = messages.Order.from_json(response.json())
        return messages.OrderResource(
            body=body, uri=response.headers.get("Location"), csr_pem=csr,
            authorizations=[client._authzr_from_response(client._post_as_get(url), uri=url)
                            for url in body.authorizations])

    def _answer(self, flow: _Flow, client: ClientV2, authzr: messages.AuthorizationResource,
                publisher: ChallengePublisher, published: list[_Undo]) -> None:
        """Publish and answer the HTTP-01 challenge of one authorization, if still needed."""
        if authzr.body.status != messages.STATUS_PENDING:
            return  # valid (reused) or already decided: the order's status tells the rest
        challb = next((c for c in authzr.body.challenges
                       if isinstance(c.chall, challenges.HTTP01)), None)
        if challb is None:
            raise IssuanceError(f"the CA offers no HTTP-01 challenge for "
                                f"{authzr.body.identifier.value}", permanent=True)
        assert flow.net is not None and flow.net.key is not None
        response, validation = challb.response_and_validation(flow.net.key)
        token = str(challb.chall.encode("token"))
        published.append(lambda: publisher.withdraw(token))
        try:
            flow.call(publisher.publish(token, validation))
        except Exception as exc:
            raise IssuanceError(f"could not publish the HTTP-01 challenge: {exc!r}") from None
        if challb.status == messages.STATUS_PENDING:
            client.answer_challenge(challb, response)

    def _answer_dns01(self, flow: _Flow, client: ClientV2,
                      authzr: messages.AuthorizationResource, dns: Dns01Publisher,
                      published: list[_Undo]) -> None:
        """Publish and answer the DNS-01 challenge of one authorization, if still needed."""
        if authzr.body.status != messages.STATUS_PENDING:
            return
        identifier = str(authzr.body.identifier.value)  # "x" for "*.x" too
        challb = next((c for c in authzr.body.challenges
                       if isinstance(c.chall, challenges.DNS01)), None)
        if challb is None:
            raise IssuanceError(f"the CA offers no DNS-01 challenge for {identifier}",
                                permanent=True)
        assert flow.net is not None and flow.net.key is not None
        response, value = challb.response_and_validation(flow.net.key)
        published.append(lambda: dns.withdraw_txt(identifier, value))
        try:
            flow.call(dns.publish_txt(identifier, value), timeout=dns.timeout)
        except IssuanceError:
            raise  # says which server refused what
        except Exception as exc:
            raise IssuanceError(f"could not publish the DNS-01 challenge: {exc!r}") from None
        if challb.status == messages.STATUS_PENDING:
            client.answer_challenge(challb, response)

    def _withdraw(self, flow: _Flow, published: list[_Undo]) -> None:
        for undo in published:
            try:
                flow.call(undo(), cancellable=False)
            except Exception as exc:  # a stale token is harmless; the order result matters
                log.warning("could not withdraw a challenge: %r", exc)

    @staticmethod
    def _post_as_get(client: ClientV2, url: str) -> requests.Response:
        return client.net.post(url, None, new_nonce_url=client.directory["newNonce"])

    def _poll(self, flow: _Flow, client: ClientV2, orderr: messages.OrderResource,
              deadline: float, *, until: Literal["ready", "valid"]) -> messages.Order:
        """POST-as-GET the order until it is `until` (or beyond); raise if it fails.

        acme's poll_and_finalize sleeps whole seconds; pebble finishes in milliseconds, so
        we start at poll_interval and back off, honouring a Retry-After the CA sends.
        """
        interval = self.settings.poll_interval
        while True:
            response = self._post_as_get(client, orderr.uri)
            body: messages.Order = messages.Order.from_json(response.json())
            if body.status == messages.STATUS_INVALID:
                raise self._order_failure(client, orderr, body)
            if body.status == messages.STATUS_VALID and body.certificate is not None:
                return body
            if until == "ready" and body.status == messages.STATUS_READY:
                return body
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise IssuanceError(
                    f"order for {_order_names(body)} still {body.status} after "
                    f"{self.settings.order_timeout:.0f} s")
            hint = _retry_after_seconds(response.headers.get("Retry-After"), None)
            flow.wait(min(remaining, hint if hint is not None else interval))
            interval = min(interval * 1.5, _MAX_POLL_INTERVAL)

    def _order_failure(self, client: ClientV2, orderr: messages.OrderResource,
                       body: messages.Order) -> IssuanceError:
        """The CA's reason for an invalid order: the order's error, else the challenge's."""
        problem = body.error
        if problem is None:
            for url in body.authorizations:
                authz = messages.Authorization.from_json(self._post_as_get(client, url).json())
                problem = next((c.error for c in authz.challenges if c.error is not None), None)
                if problem is not None:
                    break
        if problem is None:
            return IssuanceError(f"order for {_order_names(body)} became invalid "
                                 "without a reason from the CA")
        return _problem_error(f"order for {_order_names(body)} failed: ", problem, None,
                              AuthorizationFailed)

    # -- renewal information

    async def renewal_time(self, account: Account,
                           cert_pem: bytes) -> tuple[float, float] | None:
        """The CA's suggested renewal window (RFC 9773) as (start, end) unix times.

        None when the directory has no renewalInfo, the certificate has no Authority Key
        Identifier, or it has already expired (RFC 9773: do not ask then; renew now).
        """
        info = await self.renewal_info(account, cert_pem)
        return info.window if info is not None else None

    async def renewal_info(self, account: Account, cert_pem: bytes) -> RenewalInfo | None:
        """renewal_time's window with the CA's Retry-After (when to ask again)."""
        return await self._run(functools.partial(self._renewal_info_sync, account, cert_pem))

    def _renewal_info_sync(self, account: Account, cert_pem: bytes,
                           flow: _Flow) -> RenewalInfo | None:
        cert = x509.load_pem_x509_certificate(cert_pem)
        if cert.not_valid_after_utc.timestamp() <= time.time():
            return None
        cert_id = _ari_cert_id(cert)
        with flow.errors("ACME renewal information"):
            client = flow.client(account.key_pem, account.uri)
            try:
                base_url = str(client.directory["renewalInfo"])
            except KeyError:
                return None
            if cert_id is None:
                return None
            assert flow.net is not None
            response = flow.net.get(f"{base_url.rstrip('/')}/{cert_id}")
            info = messages.RenewalInfo.from_json(response.json())
            window = info.suggested_window
            return RenewalInfo((window.start.timestamp(), window.end.timestamp()),
                               _retry_after_seconds(response.headers.get("Retry-After"), None))


def _order_names(body: messages.Order) -> str:
    return ", ".join(str(i.value) for i in body.identifiers or ()) or "the domain"

