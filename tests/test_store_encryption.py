"""Private keys encrypted at rest (`store.encryption`, store/sealing.py, store/rekey.py).

Real `tlsedge run` nodes, the real `tlsedge` CLI, real file stores and a real etcd (read
raw with `etcdctl get --prefix` and from the store's files), Python ssl and `openssl
s_client`. The store-level checks use the real SealedStore over real backends.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.errors import StoreError
from proxy.registry import Registry
from proxy.store import check_store
from proxy.store import records as rec
from proxy.store.base import Store
from proxy.store.etcd import EtcdSettings, EtcdStore
from proxy.store.files import FileStore
from proxy.store.rekey import rekey
from proxy.store.sealing import (
    MAGIC,
    Keyring,
    SealedStore,
    key_id,
    load_keyring,
    read_registry,
    sealed_with,
)
from tests.certgen import CA, Issued
from tests.conftest import PLATFORM
from tests.support.admin import edge_settings
from tests.support.backend import Backend
from tests.support.edge import Edge
from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
NAMES = [f"shop{i}.example" for i in range(4)]


# --------------------------------------------------------------------------- helpers

def write_key(path: Path, key: bytes | None = None, mode: int = 0o600) -> bytes:
    key = os.urandom(32) if key is None else key
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    os.chmod(path, mode)
    return key


def tlsedge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def ok(*args: str) -> str:
    done = tlsedge(*args)
    assert done.returncode == 0, f"{args}: exit {done.returncode}: {done.stderr}"
    return done.stdout


def key_secrets(issued: Issued) -> list[bytes]:
    """What must never be found in the store in clear: the key's DER, its PEM body."""
    key = serialization.load_pem_private_key(issued.key_pem, None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return [der, base64.b64encode(der)[:48], issued.key_pem.splitlines()[1]]


def assert_no_key_in_clear(raw: bytes, issued: list[Issued]) -> None:
    assert b"PRIVATE KEY" not in raw
    for cert in issued:
        for secret in key_secrets(cert):
            assert secret not in raw


def raw_files(store_dir: Path) -> bytes:
    """Every byte of every file of a file store (records, log, checkpoints)."""
    return b"".join(p.read_bytes() for p in sorted(store_dir.rglob("*")) if p.is_file())


def raw_etcd(endpoint: str, prefix: str) -> bytes:
    """`etcdctl get --prefix`: keys and values as etcd holds them."""
    done = subprocess.run(["etcdctl", "--endpoints", endpoint, "get", "--prefix", prefix],
                          capture_output=True, timeout=30, env={**os.environ,
                                                                "ETCDCTL_API": "3"})
    assert done.returncode == 0, done.stderr
    assert prefix.encode() in done.stdout  # it did read our records
    return done.stdout


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


class Site:
    """A store (files or etcd) with encryption, and node configs on it."""

    def __init__(self, backend_name: str, tmp_path: Path, ca: CA, backend: Backend,
                 etcd: EtcdServer | None) -> None:
        self.tmp = tmp_path
        self.ca = ca
        self.backend = backend
        self.etcd = etcd
        self.prefix = f"/enc-{uuid.uuid4().hex[:8]}/"
        self.keys = {"old": tmp_path / "old.key", "new": tmp_path / "new.key"}
        self.key_bytes = {"old": write_key(self.keys["old"])}
        if etcd is not None:
            self.store: dict[str, Any] = {"backend": "etcd", "endpoints": [etcd.endpoint],
                                          "prefix": self.prefix}
        else:
            self.store = {"path": str(tmp_path / "store")}

    def settings(self, node: str, keys: list[str]) -> dict[str, Any]:
        workdir = self.tmp / node
        workdir.mkdir(exist_ok=True)
        settings = edge_settings(workdir, self.ca, self.backend)
        settings["store"] = {**self.store, "encryption": {
            "key_files": [str(self.keys[k]) for k in keys]}}
        if self.etcd is not None:
            settings["node"] = {"name": node}
        return settings

    def edge(self, node: str, keys: list[str], *, start: bool = True) -> Edge:
        return Edge(self.tmp / node, self.settings(node, keys), start=start)

    def raw(self) -> bytes:
        if self.etcd is not None:
            return raw_etcd(self.etcd.endpoint, self.prefix)
        return raw_files(Path(self.store["path"]))

    def inner(self) -> Store:
        if self.etcd is not None:
            return EtcdStore(EtcdSettings(endpoints=(self.etcd.endpoint,), prefix=self.prefix))
        return FileStore(self.store["path"])

    def read(self, action: Callable[[Store], Any]) -> Any:
        """`action(raw backend)` on a fresh client of the site's store."""
        async def main() -> Any:
            store = self.inner()
            try:
                return await action(store)
            finally:
                await store.close()
        return asyncio.run(main())

    def sealed_ids(self) -> dict[str, str | None]:
        """Key id of every record at a secret path, as stored."""
        async def ids(store: Store) -> dict[str, str | None]:
            items = [*await store.scan(rec.PEM), *await store.scan(rec.ACME)]
            return {i.key: sealed_with(i.value) for i in items}
        result: dict[str, str | None] = self.read(ids)
        return result


@pytest.fixture(params=["files", "etcd"])
def site(request: pytest.FixtureRequest, tmp_path: Path, ca: CA, backend: Backend) -> Site:
    server = request.getfixturevalue("etcd") if request.param == "etcd" else None
    return Site(request.param, tmp_path, ca, backend, server)


def add_custom_domains(edge: Edge, ca: CA, names: list[str]) -> dict[str, Issued]:
    issued = {}
    for name in names:
        cert = issued[name] = ca.issue([name])
        chain, key = cert.write(edge.workdir, name)
        ok("domains", "add", name, "--app", "my-app", "--cert", str(chain), "--key", str(key),
           "-c", str(edge.config_path))
    return issued


def reconfigure(edge: Edge, settings: dict[str, Any]) -> None:
    """Write a new config for `edge`, on the ports it was given."""
    edge.write_config({**settings, "listen": edge.config["listen"]})


def serves(edge: Edge, issued: dict[str, Issued]) -> bool:
    return all(edge.fingerprint(name) == cert.fingerprint for name, cert in issued.items())


# --------------------------------------------------------------------------- end to end

def test_private_keys_are_stored_encrypted_and_every_node_serves_them(site: Site) -> None:
    nodes = ["a", "b"] if site.etcd is not None else ["a"]
    edges = [site.edge(node, ["old"]) for node in nodes]
    try:
        issued = add_custom_domains(edges[0], site.ca, NAMES)
        for edge in edges:
            wait_for(lambda edge=edge: serves(edge, issued), 20, f"node {edge} serving")
            assert edge.openssl_fingerprint(NAMES[0]) == issued[NAMES[0]].fingerprint
            status, _, _ = edge.request(NAMES[1], "/hello")
            assert status == 200
    finally:
        for edge in edges:
            edge.stop()
    assert_no_key_in_clear(site.raw(), list(issued.values()))
    old = key_id(site.key_bytes["old"])
    ids = site.sealed_ids()
    assert len(ids) == len(NAMES) and set(ids.values()) == {old}


def test_rekey_while_serving_leaves_every_record_under_the_new_key_with_no_failed_handshake(
        site: Site) -> None:
    edge = site.edge("a", ["old"])
    try:
        issued = add_custom_domains(edge, site.ca, NAMES)
        wait_for(lambda: serves(edge, issued), 20, "the domains served")
    finally:
        edge.stop()
    # Rotation: every node gets the new key first (listed first), then rekey runs.
    site.key_bytes["new"] = write_key(site.keys["new"])
    new = key_id(site.key_bytes["new"])
    edge = site.edge("a", ["new", "old"])
    failures: list[str] = []
    handshakes = [0]
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            for name, cert in issued.items():
                try:
                    if edge.fingerprint(name) != cert.fingerprint:
                        failures.append(f"{name}: another certificate")
                except OSError as exc:
                    failures.append(f"{name}: {exc}")
                handshakes[0] += 1

    client = threading.Thread(target=traffic)
    client.start()
    try:
        wait_for(lambda: handshakes[0] > 20, 20, "traffic")
        out = ok("store", "rekey", "-c", str(edge.config_path))
        assert f"every private key is encrypted with key {new}" in out
        during = handshakes[0]
        wait_for(lambda: handshakes[0] > during + 20, 20, "traffic after the rekey")
    finally:
        stop.set()
        client.join()
        edge.stop()
    assert failures == []
    assert set(site.sealed_ids().values()) == {new}
    assert site.read(read_registry)[0] == (new,)
    assert_no_key_in_clear(site.raw(), list(issued.values()))
    # Run again: nothing left to do (resumable, idempotent).
    assert f"0 records encrypted with key {new}, {len(NAMES)} already were" in ok(
        "store", "rekey", "-c", str(edge.config_path))
    # The old key removed: everything still served.
    edge = site.edge("a", ["new"])
    try:
        assert serves(edge, issued)
        assert edge.openssl_fingerprint(NAMES[2]) == issued[NAMES[2]].fingerprint
    finally:
        edge.stop()


def test_a_wrong_or_missing_key_stops_start_up_with_one_clear_line(
        tmp_path: Path, ca: CA, backend: Backend) -> None:
    site = Site("files", tmp_path, ca, backend, None)
    edge = site.edge("a", ["old"], start=False)
    add_custom_domains(edge, ca, NAMES[:1])
    old = key_id(site.key_bytes["old"])
    site.key_bytes["new"] = write_key(site.keys["new"])

    def refused(settings: dict[str, Any]) -> str:
        reconfigure(edge, settings)
        done = tlsedge("run", "-c", str(edge.config_path), timeout=60)
        assert done.returncode == 1, done.stderr
        assert "serving https" not in done.stderr
        return done.stderr.strip().splitlines()[-1]

    wrong = refused(site.settings("a", ["new"]))
    assert wrong.endswith(f"the store holds private keys encrypted with key {old}, which "
                          "none of store.encryption.key_files holds (they hold "
                          f"{key_id(site.key_bytes['new'])}): add the key file that has it")
    plain = site.settings("a", ["new"])
    del plain["store"]["encryption"]
    assert "store.encryption is not set" in refused(plain)
    missing = site.settings("a", ["old"])
    missing["store"]["encryption"]["key_files"] = [str(tmp_path / "gone.key")]
    assert "store.encryption.key_files[0]: file not found" in refused(missing)
    # The CLI refuses too (it would write keys the nodes cannot read, or in clear).
    reconfigure(edge, plain)
    done = tlsedge("domains", "list", "-c", str(edge.config_path))
    assert done.returncode == 1 and "store.encryption is not set" in done.stderr
    # With the right key the same store serves.
    reconfigure(edge, site.settings("a", ["new", "old"]))
    edge.start()
    try:
        status, _, _ = edge.request(NAMES[0], "/")
        assert status == 200
    finally:
        edge.stop()


def test_key_files_open_to_others_or_not_32_bytes_are_refused(tmp_path: Path, ca: CA,
                                                              backend: Backend) -> None:
    site = Site("files", tmp_path, ca, backend, None)
    edge = site.edge("a", ["old"], start=False)

    def check(key: Path) -> subprocess.CompletedProcess[str]:
        settings = site.settings("a", ["old"])
        settings["store"]["encryption"]["key_files"] = [str(key)]
        reconfigure(edge, settings)
        return tlsedge("check-config", "-c", str(edge.config_path))

    readable = tmp_path / "readable.key"
    write_key(readable, mode=0o640)
    done = check(readable)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"tlsedge: tlsedge.yaml: store.encryption.key_files[0]: {readable} is accessible to "
        "group or others (mode 0640): chmod 600 it")
    short = tmp_path / "short.key"
    write_key(short, os.urandom(16))
    done = check(short)
    assert done.returncode == 1 and "is not a 32-byte key" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    for text in (os.urandom(32).hex().encode() + b"\n",
                 base64.b64encode(os.urandom(32)) + b"\n"):
        write_key(short, text)
        assert check(short).returncode == 0
    # The same key listed twice is a mistake (a rotation that forgot the new key).
    settings = site.settings("a", ["old"])
    settings["store"]["encryption"]["key_files"] *= 2
    reconfigure(edge, settings)
    done = tlsedge("check-config", "-c", str(edge.config_path))
    assert done.returncode == 1 and "holds the same key as key_files[0]" in done.stderr


def test_check_config_warns_once_when_etcd_would_keep_private_keys_in_clear(
        tmp_path: Path, ca: CA, backend: Backend) -> None:
    site = Site("files", tmp_path, ca, backend, None)
    edge = site.edge("a", ["old"], start=False)
    settings = site.settings("a", ["old"])
    warning = "warning: store.encryption is not set: every etcd member and backup holds"
    for store, warned in (({"backend": "etcd", "endpoints": ["127.0.0.1:2379"]}, True),
                          ({"backend": "etcd", "endpoints": ["127.0.0.1:2379"],
                            "encryption": settings["store"]["encryption"]}, False),
                          ({"path": "store"}, False)):
        reconfigure(edge, {**settings, "store": store})
        done = tlsedge("check-config", "-c", str(edge.config_path))
        assert done.returncode == 0, done.stderr
        assert done.stderr.count(warning) == (1 if warned else 0), done.stderr


# --------------------------------------------------------------------------- store level

def sealed_over(site: Site, keys: list[bytes]) -> Callable[[Callable[..., Any]], Any]:
    """Run `action(sealed store, registry)` on the site's store sealed with `keys`."""
    def run(action: Callable[..., Any]) -> Any:
        async def main() -> Any:
            store = SealedStore(site.inner(), Keyring(keys))
            try:
                return await action(store, Registry(store, platform_domain=PLATFORM,
                                                    apps={"my-app"}))
            finally:
                await store.close()
        return asyncio.run(main())
    return run


def test_a_record_copied_to_another_domains_path_does_not_decrypt(
        site: Site, caplog: pytest.LogCaptureFixture) -> None:
    run = sealed_over(site, [site.key_bytes["old"]])
    issued = {name: site.ca.issue([name]) for name in NAMES[:2]}
    a, b = NAMES[:2]

    async def upload(store: SealedStore, registry: Registry) -> str:
        for name, cert in issued.items():
            await registry.add_domain(name, "my-app")
            await registry.set_custom_certificate(name, cert.chain_pem, cert.key_pem)
        # Someone with write access to the store copies a's key material over b's.
        source = await store.inner.get(rec.pem_key(a, "custom", issued[a].fingerprint))
        assert source is not None
        target = rec.pem_key(b, "custom", issued[b].fingerprint)
        await store.inner.put(target, source.value)
        return target

    target = run(upload)

    async def read(store: SealedStore, registry: Registry) -> None:
        with pytest.raises(StoreError) as raised:
            await registry.certificate_bundle(b, "custom")
        assert str(raised.value) == (
            f"store record {target} does not decrypt with key {key_id(site.key_bytes['old'])}"
            ": it was encrypted for another path (copied there?) or it is damaged")
        # A bulk read leaves it out (logged) and returns the others.
        with caplog.at_level(logging.ERROR, logger="tlsedge.store.sealing"):
            keys = [i.key for i in await store.scan(rec.PEM)]
        assert keys == [rec.pem_key(a, "custom", issued[a].fingerprint)]
        assert f"ignoring store record {target}: store record {target} does not decrypt" in \
            caplog.text
        bundle = await registry.certificate_bundle(a, "custom")
        assert bundle is not None and bundle.fingerprint == issued[a].fingerprint
    run(read)


def test_records_written_before_encryption_are_read_and_rekey_encrypts_them(
        tmp_path: Path, ca: CA, backend: Backend) -> None:
    site = Site("files", tmp_path, ca, backend, None)
    issued = {name: ca.issue([name]) for name in NAMES[:2]}
    a, b = NAMES[:2]

    async def plain(store: Store) -> None:
        registry = Registry(store, platform_domain=PLATFORM, apps={"my-app"})
        for name in issued:
            await registry.add_domain(name, "my-app")
        await registry.set_custom_certificate(a, issued[a].chain_pem, issued[a].key_pem)
        # b as written before key material was split out of certificate records.
        meta = rec.CertRecord(domain=b, source="custom", names=(b,), not_before=0,
                              not_after=time.time() + 86400, fingerprint=issued[b].fingerprint,
                              issuer="test", key_type="ecdsa",
                              chain_pem=issued[b].chain_pem.decode(),
                              key_pem=issued[b].key_pem.decode())
        await store.put(rec.cert_key(b, "custom"), rec.encode(meta))
        await store.put(rec.ACME_ACCOUNT, rec.encode(rec.AccountRecord(
            directory="https://ca.test/dir", uri="https://ca.test/acct/1",
            key_pem=issued[a].key_pem.decode())))
    site.read(plain)
    assert b"PRIVATE KEY" in raw_files(tmp_path / "store")
    run = sealed_over(site, [site.key_bytes["old"]])

    async def sweep(store: SealedStore, registry: Registry) -> Any:
        before = await registry.certificate_bundle(a, "custom")  # read in clear
        assert before is not None and before.fingerprint == issued[a].fingerprint
        return await rekey(store)
    report = run(sweep)
    assert (report.resealed, report.split, report.current) == (2, 1, 1)
    assert report.failed == [] and report.narrowed
    assert_no_key_in_clear(raw_files(tmp_path / "store"), list(issued.values()))

    async def after(store: SealedStore, registry: Registry) -> None:
        for name in issued:
            bundle = await registry.certificate_bundle(name, "custom")
            assert bundle is not None and bundle.fingerprint == issued[name].fingerprint
            assert bundle.key_pem == issued[name].key_pem
        account = await store.get(rec.ACME_ACCOUNT)
        assert account is not None
        assert rec.decode(account.value, rec.AccountRecord).key_pem.encode() == \
            issued[a].key_pem
    run(after)


class FailingFileStore(FileStore):
    """A FileStore whose writes start failing after `budget` of them (a rekey cut
    short: the process killed, the disk full)."""

    budget = 10**9

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  secret: bool = False) -> int:
        if key.startswith(rec.PEM):
            if self.budget <= 0:
                raise StoreError("no space left on device")
            self.budget -= 1
        return await super().put(key, value, expect=expect, secret=secret)


def test_an_interrupted_rekey_resumes_where_it_stopped(tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    path = tmp_path / "store"
    values = {f"pem/d{i}.example/acme/f{i}": b"material %d" % i for i in range(40)}

    async def main() -> None:
        store = SealedStore(FileStore(path), Keyring([old]))
        for key, value in values.items():
            await store.put(key, value)
        inner = FailingFileStore(path)
        inner.budget = 15
        rotated = SealedStore(inner, Keyring([new, old]))
        with pytest.raises(StoreError, match="no space left"):
            await rekey(rotated)
        ids = [sealed_with(i.value) for i in await inner.scan(rec.PEM)]
        assert ids.count(key_id(new)) == 15 and ids.count(key_id(old)) == 25
        # Not narrowed: a node with the new key only refuses to start.
        with pytest.raises(StoreError, match=f"encrypted with key {key_id(old)}"):
            await check_store(SealedStore(inner, Keyring([new])))
        inner.budget = 10**9
        report = await rekey(rotated)
        assert (report.current, report.resealed, report.narrowed) == (15, 25, True)
        only_new = SealedStore(inner, Keyring([new]))
        await check_store(only_new)
        assert {i.key: i.value for i in await only_new.scan(rec.PEM)} == values
        assert all(i.value.startswith(MAGIC) for i in await inner.scan(rec.PEM))
        await store.close()
        await inner.close()
    asyncio.run(main())


def test_keyring_file_formats_and_ids(tmp_path: Path) -> None:
    raw = os.urandom(32)
    files = []
    for i, data in enumerate((raw, raw.hex().encode(), base64.b64encode(raw) + b"\n")):
        path = tmp_path / f"k{i}"
        write_key(path, data)
        files.append(str(path))
    for path in files:  # one key, three spellings
        assert load_keyring([path]).current == key_id(raw)
    other = tmp_path / "other"
    write_key(other)
    keyring = load_keyring([str(other), files[0]])
    assert keyring.ids == (key_id(other.read_bytes()), key_id(raw))
    assert raw.hex() not in repr(keyring) and keyring.current in repr(keyring)
