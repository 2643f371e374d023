"""Shared fixtures: a throwaway CA, certificate files, recording backends, a running edge."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certgen import CA, Issued
from tests.support.backend import Backend
from tests.support.edge import Edge

PLATFORM = "osc-fr1.scalingo.test"


@pytest.fixture(scope="session")
def ca() -> CA:
    return CA.new("tlsedge test CA")


@pytest.fixture
def certs(tmp_path: Path, ca: CA) -> Callable[..., tuple[Issued, str, str]]:
    """Issue a certificate and write it: returns (issued, cert_path, key_path)."""

    def make(names: list[str], stem: str | None = None, **kw: Any) -> tuple[Issued, str, str]:
        issued = ca.issue(names, **kw)
        cert, key = issued.write(tmp_path, stem or names[0].replace("*", "star"))
        return issued, str(cert), str(key)

    return make


@pytest.fixture
def backend() -> Iterator[Backend]:
    with Backend("b1") as b:
        yield b


@pytest.fixture
def edge_config(certs: Callable[..., tuple[Issued, str, str]], backend: Backend
                ) -> tuple[dict[str, Any], dict[str, Issued]]:
    """A config with the platform wildcard, one custom-domain certificate and one app."""
    platform, pcert, pkey = certs([f"*.{PLATFORM}"], stem="platform")
    shop, scert, skey = certs(["www.shop.test", "shop.test"], stem="shop")
    config = {
        "platform_domain": PLATFORM,
        "workers": 1,
        "tls": {"platform_certificate": {"cert": pcert, "key": pkey},
                "certificates": [{"cert": scert, "key": skey}]},
        "store": {"path": "store"},
        "apps": {"my-app": {"backends": [backend.address]}},
        "domains": {"www.shop.test": "my-app"},
        "limits": {"drain_timeout": 5.0},
    }
    return config, {"platform": platform, "shop": shop}


@pytest.fixture
def edge(tmp_path: Path, edge_config: tuple[dict[str, Any], dict[str, Issued]]
         ) -> Iterator[Edge]:
    config, _ = edge_config
    with Edge(tmp_path, config) as e:
        yield e
