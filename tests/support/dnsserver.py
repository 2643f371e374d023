"""A small authoritative DNS server for tests (dnspython, UDP + TCP on 127.0.0.1).

Answers A/AAAA/CNAME/TXT (and CAA, if set) from an in-memory table that a test may change
at any moment; unknown names get NXDOMAIN. It never recurses. One-label wildcards
(``*.example.test``) match names that are not in the table themselves.

    with DNSServer() as dns_server:
        dns_server.set_a("app.example.test", ["127.0.0.1"])
        ...  # point pebble / a dns.asyncresolver.Resolver at dns_server.port
"""

from __future__ import annotations

import collections
import contextlib
import socketserver
import threading
from collections.abc import Iterable
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rrset

__all__ = ["DNSServer"]

_MAX_CNAME_CHAIN = 8
_UDP_DEFAULT_PAYLOAD = 512

_Node = dict[dns.rdatatype.RdataType, dns.rrset.RRset]


def _name(name: str | dns.name.Name) -> dns.name.Name:
    """Absolute dnspython name from text (a trailing dot is optional)."""
    if isinstance(name, dns.name.Name):
        return name if name.is_absolute() else name.concatenate(dns.name.root)
    return dns.name.from_text(name)


class DNSServer:
    """Authoritative test DNS server on 127.0.0.1, UDP and TCP on the same ephemeral port."""

    def __init__(self, *, ttl: int = 1) -> None:
        """Create the server (not yet listening); `ttl` is the default TTL of every record."""
        self.ttl = ttl
        self._zone: dict[dns.name.Name, _Node] = {}
        self._lock = threading.Lock()
        self._udp: socketserver.UDPServer | None = None
        self._tcp: socketserver.ThreadingTCPServer | None = None
        self._threads: list[threading.Thread] = []
        self.queries: collections.deque[tuple[str, str, str]] = collections.deque(maxlen=10_000)
        """Recent queries as (transport, name, type), oldest first, e.g. ("udp", "a.test.", "A")."""

    # ----------------------------------------------------------------- records

    def set_records(
        self, name: str, rdtype: str, values: Iterable[str], *, ttl: int | None = None
    ) -> None:
        """Replace the records of one type at `name` (values in zone-file text form)."""
        owner = _name(name)
        kind = dns.rdatatype.from_text(rdtype)
        texts = list(values)
        if not texts:
            self.remove(name, rdtype)
            return
        rrset = dns.rrset.from_text_list(
            owner, self.ttl if ttl is None else ttl, dns.rdataclass.IN, kind, texts
        )
        with self._lock:
            node = self._zone.setdefault(owner, {})
            if kind == dns.rdatatype.CNAME:
                node.clear()  # a CNAME owns its name alone
            else:
                node.pop(dns.rdatatype.CNAME, None)
            node[kind] = rrset

    def set_a(self, name: str, addresses: Iterable[str], *, ttl: int | None = None) -> None:
        """Set the A records of `name`."""
        self.set_records(name, "A", addresses, ttl=ttl)

    def set_aaaa(self, name: str, addresses: Iterable[str], *, ttl: int | None = None) -> None:
        """Set the AAAA records of `name`."""
        self.set_records(name, "AAAA", addresses, ttl=ttl)

    def set_cname(self, name: str, target: str, *, ttl: int | None = None) -> None:
        """Make `name` a CNAME to `target` (drops the name's other records)."""
        self.set_records(name, "CNAME", [_name(target).to_text()], ttl=ttl)

    def set_txt(self, name: str, values: Iterable[str], *, ttl: int | None = None) -> None:
        """Set the TXT records of `name` (plain strings; quoting is done here)."""
        quoted = ['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values]
        self.set_records(name, "TXT", quoted, ttl=ttl)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove every record of `name` (it then answers NXDOMAIN), or only one type."""
        owner = _name(name)
        with self._lock:
            if rdtype is None:
                self._zone.pop(owner, None)
                return
            node = self._zone.get(owner)
            if node is not None:
                node.pop(dns.rdatatype.from_text(rdtype), None)
                if not node:
                    del self._zone[owner]

    def clear(self) -> None:
        """Forget every record."""
        with self._lock:
            self._zone.clear()

    # ---------------------------------------------------------------- answering

    def _lookup(self, name: dns.name.Name) -> tuple[_Node | None, bool]:
        """The node for `name`, exact first then a one-label wildcard; and whether wildcard."""
        node = self._zone.get(name)
        if node is not None:
            return node, False
        if len(name) > 2:
            node = self._zone.get(dns.name.Name(("*",)).concatenate(name.parent()))
            if node is not None:
                return node, True
        return None, False

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """Build the authoritative response to `query` (usable without sockets, too)."""
        response = dns.message.make_response(query, recursion_available=False)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        name, rdtype = question.name, question.rdtype
        with self._lock:
            for _ in range(_MAX_CNAME_CHAIN):
                node, wildcard = self._lookup(name)
                if node is None:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                    break
                if rdtype == dns.rdatatype.ANY:
                    found = list(node.values())
                elif rdtype in node:
                    found = [node[rdtype]]
                else:
                    found = []
                if found:
                    response.answer.extend(self._owned(r, name, wildcard) for r in found)
                    break
                cname = node.get(dns.rdatatype.CNAME)
                if cname is None:
                    break  # NODATA: the name exists, the type does not
                response.answer.append(self._owned(cname, name, wildcard))
                target = cname[0]
                assert isinstance(target, dns.rdtypes.ANY.CNAME.CNAME)
                name = target.target
        return response

    @staticmethod
    def _owned(rrset: dns.rrset.RRset, name: dns.name.Name, wildcard: bool) -> dns.rrset.RRset:
        """The rrset as answered for `name` (a wildcard's copy carries the query name)."""
        if not wildcard:
            return rrset
        return dns.rrset.from_rdata_list(name, rrset.ttl, list(rrset))

    def _handle(self, wire: bytes, transport: str) -> dns.message.Message | None:
        """Parse one query, record it and answer it; None for garbage."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.question:
            q = query.question[0]
            self.queries.append((transport, q.name.to_text(), dns.rdatatype.to_text(q.rdtype)))
        return self.answer(query)

    # ------------------------------------------------------------------ sockets

    @property
    def port(self) -> int:
        """The UDP and TCP port the server listens on."""
        if self._udp is None:
            raise RuntimeError("DNSServer is not started")
        port: int = self._udp.server_address[1]
        return port

    @property
    def address(self) -> str:
        """"127.0.0.1:PORT", the form pebble's -dnsserver flag takes."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> DNSServer:
        """Bind UDP and TCP to one free port and serve in background threads."""
        if self._udp is not None:
            return self
        server = self

        class UDPHandler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                response = server._handle(data, "udp")
                if response is None:
                    return
                limit = response.payload if response.edns >= 0 else _UDP_DEFAULT_PAYLOAD
                wire = response.to_wire(max_size=max(limit, _UDP_DEFAULT_PAYLOAD),
                                        prefer_truncation=True)
                sock.sendto(wire, self.client_address)

        class TCPHandler(socketserver.StreamRequestHandler):
            timeout = 5.0

            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    while True:
                        head = self.rfile.read(2)
                        if len(head) < 2:
                            return
                        data = self.rfile.read(int.from_bytes(head, "big"))
                        response = server._handle(data, "tcp")
                        if response is None:
                            return
                        self.wfile.write(response.to_wire(prepend_length=True))
                        self.wfile.flush()

        for _ in range(20):
            udp = socketserver.ThreadingUDPServer(("127.0.0.1", 0), UDPHandler)
            udp.daemon_threads = True
            tcp = socketserver.ThreadingTCPServer(
                ("127.0.0.1", udp.server_address[1]), TCPHandler, bind_and_activate=False
            )
            tcp.allow_reuse_address = True
            tcp.daemon_threads = True
            tcp.block_on_close = False
            try:
                tcp.server_bind()
                tcp.server_activate()
            except OSError:
                udp.server_close()
                tcp.server_close()
                continue
            break
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        self._udp, self._tcp = udp, tcp
        for srv in (udp, tcp):
            thread = threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                name=f"dns-{type(srv).__name__}", daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop serving and release both sockets."""
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads.clear()
        self._udp = self._tcp = None

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
