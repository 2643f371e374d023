"""Sources -> immutable snapshots (CertTable, RouteTable) ready to swap in.

A snapshot is built whole and validated before anyone sees it; a failure raises and
leaves whatever is serving untouched. Nothing here swaps: the composition root does
that with one assignment per table. Never imports the data plane.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from proxy import config as config_mod
from proxy.certs.bundle import load_bundle_files
from proxy.certs.table import CertEntry, CertTable
from proxy.certs.tls import TlsSettings
from proxy.config import Config
from proxy.errors import BundleError, ConfigError
from proxy.routing import App, RouteTable

log = logging.getLogger("tlsedge.sync")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a worker serves from, derived from one config file and its certs."""

    config: Config
    certs: CertTable
    routes: RouteTable
    tls: TlsSettings

    def expiry(self) -> list[tuple[str, str, float]]:
        """(primary name, source, not_after) of every loaded certificate."""
        return [(e.bundle.primary_name, e.source, e.bundle.not_after)
                for e in self.certs.entries()]


def tls_settings(config: Config) -> TlsSettings:
    return TlsSettings(num_tickets=config.tls.session_tickets)


def build_routes(config: Config) -> RouteTable:
    apps = {name: App.from_config(name, spec) for name, spec in config.apps.items()}
    return RouteTable(config.platform_domain, apps, config.domains)


def load_static(path: str) -> Snapshot:
    """Read the config file and every certificate file it names; validate all of it.

    Raises ConfigError with one line naming the file and what is wrong.
    """
    config = config_mod.load(path)
    label = config.source.rsplit("/", 1)[-1]
    now = time.time()

    def entry(files: config_mod.CertFiles, key: str, source: str) -> CertEntry:
        try:
            bundle = load_bundle_files(files.cert, files.key, check_time=False)
        except BundleError as exc:
            raise ConfigError(f"{label}: {key}: {exc}") from None
        if not bundle.is_valid_at(now):
            log.warning("%s: %s: certificate for %s is outside its validity period",
                        label, key, bundle.primary_name)
        return CertEntry(bundle, source)

    platform = entry(config.tls.platform_certificate, "tls.platform_certificate", "platform")
    wildcard = f"*.{config.platform_domain}"
    if not platform.bundle.covers(f"x.{config.platform_domain}"):
        raise ConfigError(
            f"{label}: tls.platform_certificate: certificate does not cover {wildcard} "
            f"(it covers {', '.join(platform.bundle.names)})")
    statics = [entry(c, f"tls.certificates[{i}]", "static")
               for i, c in enumerate(config.tls.certificates)]
    reject = config.tls.unknown_sni == "reject"
    # Ops-managed certificates win over the platform wildcard for the names they cover.
    table = CertTable.from_entries([*statics, platform], None if reject else platform,
                                   reject_unknown=reject)
    return Snapshot(config=config, certs=table, routes=build_routes(config),
                    tls=tls_settings(config))
