"""The ACME client of the lifecycle: accounts, HTTP-01 orders and ARI renewal windows.

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
import re
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import josepy.errors
import requests
from acme import challenges, messages
from acme import errors as acme_errors
from acme.client import ClientNetwork, ClientV2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from josepy import jwa, jwk

from proxy.errors import IssuanceError

__all__ = ["PERMANENT_PROBLEMS", "Account", "AcmeClient", "AcmeSettings",
           "ChallengePublisher", "Issued"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_USER_AGENT = "tlsedge"
_NETWORK_TIMEOUT = 30  # seconds per HTTP request to the CA
_BADNONCE_ROUNDS = 5  # each round is acme's own try + one retry: up to 10 sends
_CALLBACK_TIMEOUT = 30.0  # publish/withdraw on the caller's loop (may write to etcd)
_CALLBACK_SLICE = 0.05  # how often a waiting flow looks whether it was cancelled
_MAX_POLL_INTERVAL = 2.0  # polling backs off towards this, so a real CA is not hammered
_CN_MAX = 64  # X.520 ub-common-name; longer names go in the SAN only

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
retry_after; accountDoesNotExist means "call ensure_account again", then retry.
"""

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


@dataclass(frozen=True)
class Issued:
    """A new certificate: fullchain PEM (leaf first) and its key (PKCS8 PEM, unencrypted)."""

    chain_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:
        return f"Issued(chain_pem=<{len(self.chain_pem)} bytes>, key_pem=<hidden>)"


# --------------------------------------------------------------------------- network


class _PatientNetwork(ClientNetwork):
    """ClientNetwork that survives runs of badNonce and remembers the last Retry-After.

    acme retries a badNonce once; pebble rejects 5 % of nonces, so two in a row happen
    about once in 400 POSTs. A request refused for badNonce was not processed (RFC 8555
    6.5), so sending it again is safe. One instance per flow: nonces and the
    requests.Session are not shared between threads.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after: str | None = None

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


def _problem_error(prefix: str, problem: messages.Error, header: str | None) -> IssuanceError:
    return IssuanceError(f"{prefix}{_problem_text(problem)}",
                         retry_after=_retry_after_seconds(header, problem),
                         permanent=_is_permanent(problem))


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


def _pkcs8(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _csr_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, domain: str) -> bytes:
    subject = ([x509.NameAttribute(NameOID.COMMON_NAME, domain)]
               if len(domain) <= _CN_MAX else [])
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name(subject))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


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
    """One account operation or order on one worker thread, with its own ClientNetwork.

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
        key, alg = _account_jwk(key_pem)
        settings = self.owner.settings
        verify: Any = settings.ca_bundle or True  # requests takes a path; acme types a bool
        self.net = _PatientNetwork(key, alg=alg, verify_ssl=verify, user_agent=_USER_AGENT,
                                   timeout=_NETWORK_TIMEOUT)
        client = ClientV2(self.owner.directory(self.net), self.net)
        if uri is not None:
            self.net.account = messages.RegistrationResource(uri=uri,
                                                             body=messages.Registration())
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
            raise _problem_error(f"{what}: ", problem, header) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise IssuanceError(f"ACME server unreachable: {_reason(exc)}") from None
        except requests.RequestException as exc:
            raise IssuanceError(f"{what}: request to the ACME server failed: {_reason(exc)}"
                                ) from None
        except acme_errors.ClientError as exc:
            raise IssuanceError(f"{what}: unexpected answer from the ACME server: "
                                f"{_client_error_text(exc)}",
                                retry_after=_retry_after_seconds(
                                    self.net.retry_after if self.net else None, None)) from None
        except (acme_errors.Error, josepy.errors.Error, ValueError, KeyError) as exc:
            raise IssuanceError(f"{what}: invalid answer from the ACME server: "
                                f"{type(exc).__name__}: {exc}") from None

    def call(self, coro: Coroutine[Any, Any, None], *, cancellable: bool = True) -> None:
        """Run a publisher coroutine on the caller's loop and wait for it.

        Waits in short slices so that a cancelled order stops waiting for a publish
        that hangs; a withdraw (cancellable=False) still gets its full time.
        """
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop is closed: nobody is waiting for this order
            coro.close()
            raise
        deadline = time.monotonic() + _CALLBACK_TIMEOUT
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

    # -- plumbing

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
        key_pem = _pkcs8(ec.generate_private_key(ec.SECP256R1())).decode()
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
        with flow.errors("ACME account registration"):
            client = flow.client(key_pem, None)
            registration = messages.NewRegistration.from_data(
                email=email_address or None, terms_of_service_agreed=True)
            try:
                uri = str(client.new_account(registration).uri)
            except acme_errors.ConflictError as found:  # this key already has an account
                uri = str(found.location)
        log.info("registered ACME account %s at %s", uri, self.settings.directory)
        return Account(self.settings.directory, uri, key_pem, email_address)

    # -- orders

    async def order(self, account: Account, domain: str,
                    publisher: ChallengePublisher) -> Issued:
        """Order a certificate for `domain` with HTTP-01; return the chain and a new key.

        Tokens are published through `publisher` before each challenge is answered and
        withdrawn afterwards, whatever happens. Takes at most about
        settings.order_timeout seconds. IssuanceError carries the CA's problem.
        """
        return await self._run(functools.partial(self._order_sync, account, domain, publisher))

    def _order_sync(self, account: Account, domain: str, publisher: ChallengePublisher,
                    flow: _Flow) -> Issued:
        started = time.monotonic()
        deadline = started + self.settings.order_timeout
        key = _certificate_key(self.settings.key_type)
        csr_pem = _csr_pem(key, domain)
        published: list[str] = []
        what = f"order for {domain}"
        try:
            with flow.errors(what):
                client = flow.client(account.key_pem, account.uri)
                orderr = client.new_order(csr_pem)
                for authzr in orderr.authorizations:
                    self._answer(flow, client, authzr, publisher, published)
                body = self._poll(flow, client, orderr, deadline, until="ready")
                if body.status == messages.STATUS_READY:
                    client.begin_finalization(orderr)
                    body = self._poll(flow, client, orderr, deadline, until="valid")
                assert body.certificate is not None
                chain = self._post_as_get(client, body.certificate).content
        finally:
            self._withdraw(flow, publisher, published)
        log.info("issued a certificate for %s in %.2f s", domain, time.monotonic() - started)
        return Issued(chain, _pkcs8(key))

    def _answer(self, flow: _Flow, client: ClientV2, authzr: messages.AuthorizationResource,
                publisher: ChallengePublisher, published: list[str]) -> None:
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
        published.append(token)
        try:
            flow.call(publisher.publish(token, validation))
        except Exception as exc:
            raise IssuanceError(f"could not publish the HTTP-01 challenge: {exc!r}") from None
        if challb.status == messages.STATUS_PENDING:
            client.answer_challenge(challb, response)

    def _withdraw(self, flow: _Flow, publisher: ChallengePublisher, tokens: list[str]) -> None:
        for token in tokens:
            try:
                flow.call(publisher.withdraw(token), cancellable=False)
            except Exception as exc:  # a stale token is harmless; the order result matters
                log.warning("could not withdraw HTTP-01 token: %r", exc)

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
        return _problem_error(f"order for {_order_names(body)} failed: ", problem, None)

    # -- renewal information

    async def renewal_time(self, account: Account,
                           cert_pem: bytes) -> tuple[float, float] | None:
        """The CA's suggested renewal window (RFC 9773) as (start, end) unix times.

        None when the directory has no renewalInfo, the certificate has no Authority Key
        Identifier, or it has already expired (RFC 9773: do not ask then; renew now).
        """
        return await self._run(functools.partial(self._renewal_time_sync, account, cert_pem))

    def _renewal_time_sync(self, account: Account, cert_pem: bytes,
                           flow: _Flow) -> tuple[float, float] | None:
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
            return window.start.timestamp(), window.end.timestamp()


def _order_names(body: messages.Order) -> str:
    return ", ".join(str(i.value) for i in body.identifiers or ()) or "the domain"

