"""Medians over rounds, ratios to nginx, the issue's targets, one table, one JSON file.

Pure formatting: never starts a process. Raw per-round numbers go into the JSON too,
so a later reader can recompute anything.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peers import PROXIES

Raw = dict[str, dict[str, dict[str, list[dict[str, float]]]]]  # scenario/variant/proxy/rounds
Medians = dict[str, dict[str, dict[str, dict[str, float]]]]


def medians_by_workers(raw: dict[str, Raw]) -> dict[str, Medians]:
    """Medians of each worker count's rounds (keys: "1", "2", ...)."""
    return {workers: medians(r) for workers, r in raw.items()}


def medians(raw: Raw) -> Medians:
    out: Medians = {}
    for scenario, variants in raw.items():
        for variant, proxies in variants.items():
            for proxy, rounds in proxies.items():
                keys = {k for r in rounds for k in r}
                out.setdefault(scenario, {}).setdefault(variant, {})[proxy] = {
                    k: statistics.median(r[k] for r in rounds if k in r) for k in sorted(keys)}
    return out


@dataclass(frozen=True)
class Row:
    label: str
    scenario: str
    variant: str
    metric: str
    fmt: str = "{:,.0f}"
    # Target on tlsedge: (">=" or "<=", factor, reference) where reference is a proxy
    # name (same metric), "abs" (factor is the bound), or "scenario/variant/proxy/metric".
    targets: tuple[tuple[str, float, str], ...] = ()
    ratios: bool = True  # False: a ratio means nothing (a percentage, a count)


HANDSHAKE_VARIANTS = ("ecdsa-tls1.3", "ecdsa-tls1.2", "rsa-tls1.3", "rsa-tls1.2")
# Issue 14's targets (the keep-alive req/s and p99 ones are issue 5's).
CPU_TARGET = (("<=", 1.3, "nginx"),)

ROWS: tuple[Row, ...] = (
    Row("keep-alive requests/s", "keepalive", "", "rps",
        targets=((">=", 0.85, "nginx"), (">=", 1.5, "caddy"))),
    Row("keep-alive CPU us/request", "keepalive", "", "cpu_us_per_req", "{:,.1f}",
        CPU_TARGET),
    Row("keep-alive p50 ms", "keepalive", "", "p50_ms", "{:,.2f}"),
    Row("keep-alive p99 ms", "keepalive", "", "p99_ms", "{:,.2f}", (("<=", 1.5, "nginx"),)),
    Row("keep-alive peak RSS MiB (all procs)", "keepalive", "", "peak_rss_mib", "{:,.1f}"),
    *(r for v in HANDSHAKE_VARIANTS for r in (
        Row(f"full handshakes/s {v}", "handshakes", v, "hs_per_s",
            targets=((">=", 0.85, "nginx"), (">=", 1.0, "caddy"))),
        Row(f"CPU us/handshake {v}", "handshakes", v, "cpu_us_per_hs", "{:,.0f}",
            CPU_TARGET))),
    Row("RSS MiB idle (all procs)", "memory", "", "rss_idle_mib", "{:,.1f}"),
    Row("worker RSS MiB idle", "memory", "", "worker_rss_idle_mib", "{:,.1f}",
        (("<=", 60.0, "abs"),)),
    Row("RSS MiB per 10,000 idle keep-alive conns", "memory", "", "rss_per_10k_idle_mib",
        "{:,.0f}"),
    Row("handshakes in the 3 RSS runs", "memory", "", "hs_in_rss_runs", ratios=False),
    Row("RSS MiB after the 3 runs (all procs)", "memory", "", "rss_after_hs_mib",
        "{:,.1f}"),
    Row("worker RSS MiB after the 3 runs", "memory", "", "worker_rss_after_hs_mib",
        "{:,.1f}"),
    Row("worker peak RSS MiB (3 runs)", "memory", "", "worker_peak_rss_mib", "{:,.1f}"),
    Row("RSS growth % in run 2", "memory", "", "rss_growth_run2_pct", "{:,.1f}",
        ratios=False),
    Row("RSS growth % in run 3", "memory", "", "rss_growth_run3_pct", "{:,.1f}",
        (("<=", 5.0, "abs"),), ratios=False),
    Row("1 MiB responses MB/s", "large", "", "mb_per_s", targets=((">=", 0.8, "nginx"),)),
    *(r for v in ("m10", "m100") for r in (
        Row(f"h2 small GETs -m {v[1:]} requests/s", "h2", v, "rps",
            targets=((">=", 1.0, "caddy"),)),
        Row(f"h2 small GETs -m {v[1:]} CPU us/request", "h2", v, "cpu_us_per_req",
            "{:,.1f}", (("<=", 1.5, "keepalive//tlsedge/cpu_us_per_req"),)),
        Row(f"h2 small GETs -m {v[1:]} p99 ms", "h2", v, "p99_ms", "{:,.2f}"))),
    Row("h2 1 MiB downloads MB/s", "h2", "1mib", "mb_per_s"),
    Row("h2 1 MiB CPU ms/MB", "h2", "1mib", "cpu_ms_per_mb", "{:,.2f}"),
    Row("1 MiB CPU ms/MB", "large", "", "cpu_ms_per_mb", "{:,.2f}"),
    Row("many names: 1-cert table, warm hs/s", "many_names", "1cert", "warm_hs_per_s"),
    Row("many names: big table, cold hs/s", "many_names", "table", "cold_hs_per_s"),
    Row("many names: big table, warm hs/s", "many_names", "table", "warm_hs_per_s",
        targets=((">=", 0.95, "many_names/1cert/tlsedge/warm_hs_per_s"),)),
    Row("many names: context builds in warm pass", "many_names", "table",
        "warm_context_builds"),
    Row("start-up: first handshake s (big store)", "many_names", "table",
        "first_handshake_s", "{:,.2f}", (("<=", 2.0, "abs"),)),
    Row("start-up: worker RSS MiB at ready", "many_names", "table",
        "worker_rss_mib_at_start", "{:,.1f}", (("<=", 400.0, "abs"),)),
    Row("many names: worker peak RSS MiB", "many_names", "table", "worker_peak_rss_mib",
        "{:,.1f}", (("<=", 400.0, "abs"),)),
    Row("hot swap: p99 ms before", "hot_swap", "", "p99_before_ms", "{:,.2f}"),
    Row("hot swap: p99 ms during store swap", "hot_swap", "", "p99_store_ms", "{:,.2f}"),
    Row("hot swap: p99 ms during SIGHUP swap", "hot_swap", "", "p99_sighup_ms", "{:,.2f}"),
    Row("hot swap: failed requests (store)", "hot_swap", "", "failed_store",
        targets=(("<=", 0.0, "abs"),)),
    Row("hot swap: failed requests (SIGHUP)", "hot_swap", "", "failed_sighup",
        targets=(("<=", 0.0, "abs"),)),
)


def _value(med: Medians, path: str) -> float | None:
    scenario, variant, proxy, metric = path.split("/")
    return med.get(scenario, {}).get(variant, {}).get(proxy, {}).get(metric)


def _check(row: Row, med: Medians, mine: float) -> list[dict[str, Any]]:
    out = []
    for op, factor, ref in row.targets:
        op = op.strip()
        if ref == "abs":
            base, what = 1.0, f"{op} {factor:g}"
        else:
            path = ref if "/" in ref else f"{row.scenario}/{row.variant}/{ref}/{row.metric}"
            got = _value(med, path)
            if not got:
                continue
            named = (ref.split("/")[1] or ref.split("/")[0]) if "/" in ref else ref
            base, what = got, f"{op} {factor:g}x {named}"
        ratio = mine / base
        ok = ratio >= factor if op == ">=" else ratio <= factor + 1e-9
        out.append({"target": what, "measured": ratio, "pass": ok, "abs": ref == "abs"})
    return out


def _ratio_columns(present: list[str]) -> list[tuple[str, str]]:
    """(proxy, reference) pairs: each proxy to nginx, and tlsedge to each floor."""
    pairs = [(p, "nginx") for p in present if p != "nginx" and "nginx" in present]
    for floor in ("floor", "floor-http"):
        if floor in present and "tlsedge" in present:
            pairs.append(("tlsedge", floor))
    return pairs


def _rows(med: Medians, present: list[str], width: int
          ) -> tuple[list[list[str]], list[dict[str, Any]]]:
    lines: list[list[str]] = []
    verdicts = []
    for row in ROWS:
        values = med.get(row.scenario, {}).get(row.variant, {})
        if not values:
            continue
        cells = [row.label]
        for p in present:
            v = values.get(p, {}).get(row.metric)
            cells.append(row.fmt.format(v) if v is not None else "-")
        for p, ref in _ratio_columns(present):
            v, base = values.get(p, {}).get(row.metric), values.get(ref, {}).get(row.metric)
            cells.append(f"{v / base:.2f}" if v is not None and base and row.ratios
                         else "-")
        mine = values.get("tlsedge", {}).get(row.metric)
        checks = _check(row, med, mine) if mine is not None else []
        for i, c in enumerate(checks):
            verdicts.append({"row": row.label, **c})
            measured = row.fmt.format(c["measured"]) if c["abs"] else f"{c['measured']:.2f}x"
            tail = [c["target"], measured, "PASS" if c["pass"] else "MISS"]
            lines.append((cells if i == 0 else [""] * len(cells)) + tail)
        if not checks:
            lines.append([*cells, "", "", ""])
    assert all(len(line) == width for line in lines)
    return lines, verdicts


def _present(meds: dict[str, Medians]) -> list[str]:
    seen = {p for med in meds.values() for variants in med.values()
            for proxies in variants.values() for p in proxies}
    return [p for p in PROXIES if p in seen]


def table(meds: dict[str, Medians]) -> tuple[str, str, list[dict[str, Any]]]:
    """The one table, as text and as Markdown, one section per worker count, and the
    target verdicts (each with its worker count)."""
    present = _present(meds)
    head = ["metric", *present, *(f"{p}/{ref}" for p, ref in _ratio_columns(present)),
            "target (tlsedge)", "measured", "result"]
    sections: list[tuple[str, list[list[str]]]] = []
    verdicts = []
    for workers, med in sorted(meds.items(), key=lambda kv: int(kv[0])):
        lines, found = _rows(med, present, len(head))
        title = f"{workers} worker{'s' if workers != '1' else ''}"
        sections.append((title, lines))
        verdicts += [{"workers": int(workers), **v} for v in found]
    return _text(head, sections), _markdown(head, sections), verdicts


def _text(head: list[str], sections: list[tuple[str, list[list[str]]]]) -> str:
    every = [head, *(line for _, lines in sections for line in lines)]
    widths = [max(len(line[i]) for line in every) for i in range(len(head))]

    def fmt(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(line, widths, strict=True)))

    out = [fmt(head)]
    for title, lines in sections:
        out += [f"-- {title} " + "-" * max(0, len(out[0]) - len(title) - 4),
                *(fmt(line) for line in lines)]
    return "\n".join(out)


def _markdown(head: list[str], sections: list[tuple[str, list[list[str]]]]) -> str:
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for title, lines in sections:
        out.append(f"| **{title}** |" + " |" * (len(head) - 1))
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |"
                for line in lines]
    return "\n".join(out)


def write_json(directory: Path, payload: dict[str, Any], *, prefix: str = "") -> Path:
    """`payload` as <prefix><timestamp>.json in `directory`, written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
