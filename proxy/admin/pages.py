"""The dashboard's server-rendered HTML: login, the domains table, one domain's page.

Every value that comes from the store, the config or a request goes through `e()`
(HTML escaping) exactly where it is placed; nothing here builds markup from data
in any other way. Scripts and styles carry the per-response CSP nonce.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable

from proxy.registry import CertView, DomainView

SOURCE_LABELS = {"custom": "Custom", "letsencrypt": "Let's Encrypt", "platform": "Platform"}
DAY = 86400.0


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def date(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def expiry_text(expires_at: float | None, now: float) -> str:
    """What the Expires column says; the polling script writes the same words."""
    if expires_at is None:
        return "platform certificate"
    days = int((expires_at - now) // DAY)
    if days < 0:
        return f"{date(expires_at)} · expired"
    return f"{date(expires_at)} · in {days} day{'' if days == 1 else 's'}"


_CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
 color:#1f2933;background:#f4f6f8}
header{background:#102a43;color:#fff;padding:0 28px;height:56px;display:flex;
 align-items:center;gap:18px}
header .brand{font-weight:650;font-size:17px;letter-spacing:.2px;color:#fff;
 text-decoration:none}
header .brand small{font-weight:400;opacity:.7;margin-left:6px}
header form{margin:0}
header .spacer{flex:1}
header button{background:transparent;color:#d9e2ec;border:1px solid #486581;
 padding:0 12px;height:32px;font-weight:500}
header button:hover{background:#243b53}
main{max-width:1080px;margin:28px auto;padding:0 24px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:16px;margin:0 0 12px}
.sub{color:#627d98;margin:0 0 20px}
.card{background:#fff;border:1px solid #d9e2ec;border-radius:8px;padding:20px 22px;
 margin-bottom:20px}
.card.flush{padding:0;overflow:hidden}
table{width:100%;border-collapse:collapse}
th{font-size:12px;text-transform:uppercase;letter-spacing:.6px;color:#627d98;
 text-align:left;padding:11px 16px;background:#f0f4f8;border-bottom:1px solid #d9e2ec}
td{padding:12px 16px;border-bottom:1px solid #eef2f6;vertical-align:top}
th,td.nowrap{white-space:nowrap}
.platform{color:#829ab1}
tr:last-child td{border-bottom:0}
a{color:#1f6feb;text-decoration:none}
a:hover{text-decoration:underline}
.domain{font-weight:600}
.muted{color:#829ab1}
.status{display:inline-block;padding:2px 10px;border-radius:999px;font-size:13px;
 font-weight:600;white-space:nowrap;border:1px solid transparent}
.s-in_use{background:#e3f9e5;color:#1f7a36;border-color:#a8e6b4}
.s-not_used{background:#eef2f6;color:#52606d;border-color:#d3dce6}
.s-pending_dns{background:#fff7e0;color:#8d5b00;border-color:#f7d070}
.s-creating{background:#e6f0ff;color:#1d4ed8;border-color:#a9c7ff}
.s-error{background:#ffe8e8;color:#b42318;border-color:#f5b3b3}
.s-disabled{background:#f5f7fa;color:#9aa5b1;border-color:#e4e7eb}
.msg{font-size:13px;color:#627d98;margin-top:4px;max-width:360px;overflow-wrap:anywhere}
.msg.err{color:#b42318}
.src{font-weight:600}
.src-custom{color:#6d28d9}.src-letsencrypt{color:#1f7a36}.src-platform{color:#52606d}
dl{display:grid;grid-template-columns:170px 1fr;gap:8px 16px;margin:0}
dt{color:#627d98}dd{margin:0;overflow-wrap:anywhere}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,monospace;color:#334e68}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:20px}
label{display:block;font-weight:600;margin:12px 0 6px}
input[type=text],input[type=password],select{width:100%;height:40px;padding:8px 10px;
 border:1px solid #bcccdc;border-radius:6px;font:inherit;background:#fff}
input[type=file]{display:block;width:100%;padding:7px;border:1px dashed #9fb3c8;
 border-radius:6px;background:#f8fafc}
button{font:inherit;font-weight:600;border-radius:6px;padding:0 18px;height:40px;
 cursor:pointer;
 border:1px solid #1f6feb;background:#1f6feb;color:#fff}
button.secondary{background:#fff;color:#334e68;border-color:#bcccdc}
button.danger{background:#fff;color:#b42318;border-color:#f5b3b3}
.actions{display:flex;gap:10px;align-items:center;margin-top:16px}
.alert{border-radius:6px;padding:10px 14px;margin:0 0 14px;font-size:14px}
.alert.error{background:#ffe8e8;color:#8a1c12;border:1px solid #f5b3b3}
.alert.ok{background:#e3f9e5;color:#14532d;border:1px solid #a8e6b4}
.inline{display:flex;gap:10px;align-items:end;flex-wrap:wrap}
.inline > div{flex:1;min-width:160px}
.inline label{margin-top:0}
.inline > div.fit{flex:none;min-width:0}
.login{max-width:380px;margin:90px auto}
"""

# Refresh statuses without reloading: poll the JSON API (same-origin, session cookie)
# and write text only (textContent), never markup.
_SCRIPT = """
(function () {
  document.querySelectorAll("form[data-confirm]").forEach(function (f) {
    f.addEventListener("submit", function (ev) {
      if (!window.confirm(f.getAttribute("data-confirm"))) ev.preventDefault();
    });
  });
  var url = document.body.getAttribute("data-poll");
  if (!url) return;
  var labels = {custom: "Custom", letsencrypt: "Let's Encrypt", platform: "Platform"};
  function expiry(ts) {
    if (ts === null) return "platform certificate";
    var days = Math.floor((ts - Date.now() / 1000) / 86400);
    var d = new Date(ts * 1000).toISOString().slice(0, 10);
    if (days < 0) return d + " \\u00b7 expired";
    return d + " \\u00b7 in " + days + " day" + (days === 1 ? "" : "s");
  }
  function put(box, field, text) {
    var el = box.querySelector('[data-field="' + field + '"]');
    if (el && el.textContent !== text) el.textContent = text;
    return el;
  }
  function apply(d, box) {
    var st = put(box, "status", d.status_label);
    if (st && /^[a-z_]+$/.test(d.status)) st.className = "status s-" + d.status;
    var msg = put(box, "message", d.status === "error" ? d.last_error : d.message);
    if (msg) msg.className = d.status === "error" ? "msg err" : "msg";
    var src = put(box, "in_use", labels[d.in_use] || d.in_use);
    if (src && /^[a-z]+$/.test(d.in_use)) src.className = "src src-" + d.in_use;
    put(box, "expires", expiry(d.expires_at));
  }
  function tick() {
    fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}})
      .then(function (r) {
        if (r.status === 401) { window.location.href = "/login"; return null; }
        return r.ok ? r.json() : null;
      })
      .then(function (data) {
        if (!data) return;
        var list = data.domains || [data];
        var boxes = document.querySelectorAll("[data-domain]");
        if (data.domains && list.length !== boxes.length) { window.location.reload(); return; }
        var byName = {};
        boxes.forEach(function (b) { byName[b.getAttribute("data-domain")] = b; });
        list.forEach(function (d) { if (byName[d.name]) apply(d, byName[d.name]); });
        document.body.setAttribute("data-polled", String(Date.now()));
      })
      .catch(function () {});
  }
  window.setInterval(tick, 3000);
})();
"""


def layout(title: str, content: str, *, nonce: str, csrf: str | None = None,
           poll: str | None = None) -> str:
    nav = ""
    if csrf is not None:
        nav = (f'<span class="spacer"></span>'
               f'<form method="post" action="/reload">{csrf_field(csrf)}'
               f'<button type="submit" title="re-read the config and the platform '
               f'certificates (SIGHUP)">Reload config</button></form>'
               f'<form method="post" action="/logout">{csrf_field(csrf)}'
               f'<button type="submit">Log out</button></form>')
    poll_attr = f' data-poll="{e(poll)}"' if poll else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{e(title)} · tlsedge admin</title>'
            f'<style nonce="{e(nonce)}">{_CSS}</style></head>'
            f'<body{poll_attr}><header><a class="brand" href="/domains">tlsedge'
            f'<small>admin</small></a>{nav}</header><main>{content}</main>'
            f'<script nonce="{e(nonce)}">{_SCRIPT}</script></body></html>')


def csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(csrf)}">'


def alerts(error: str | None = None, ok: str | None = None) -> str:
    out = ""
    if error:
        out += f'<div class="alert error" role="alert" id="error">{e(error)}</div>'
    if ok:
        out += f'<div class="alert ok" role="status" id="ok">{e(ok)}</div>'
    return out


def login_page(*, nonce: str, login_csrf: str, error: str | None = None) -> str:
    content = (
        f'<div class="card login"><h1>Log in</h1>'
        f'<p class="sub">Paste the admin token (from the file named by '
        f'<code>admin.token_file</code>).</p>{alerts(error)}'
        f'<form method="post" action="/login">'
        f'<input type="hidden" name="csrf" value="{e(login_csrf)}">'
        f'<label for="token">Admin token</label>'
        f'<input type="password" id="token" name="token" autocomplete="current-password" '
        f'required autofocus><div class="actions"><button type="submit" id="login">Log in'
        f'</button></div></form></div>')
    return layout("Log in", content, nonce=nonce)


def _status_cells(v: DomainView) -> str:
    text = v.last_error if v.status == "error" else v.message
    cls = "msg err" if v.status == "error" else "msg"
    return (f'<span class="status s-{e(v.status)}" data-field="status">{e(v.status_label)}'
            f'</span><div class="{cls}" data-field="message">{e(text)}</div>')


def _source(v: DomainView) -> str:
    return (f'<span class="src src-{e(v.in_use)}" data-field="in_use">'
            f'{e(SOURCE_LABELS.get(v.in_use, v.in_use))}</span>')


def domains_page(views: Iterable[DomainView], apps: Iterable[str], *, nonce: str, csrf: str,
                 now: float, error: str | None = None, ok: str | None = None) -> str:
    rows = "".join(
        f'<tr data-domain="{e(v.name)}"><td><a class="domain" href="/domains/{e(v.name)}">'
        f'{e(v.name)}</a></td><td class="nowrap">{e(v.app)}</td><td class="nowrap">'
        f'{_source(v)}</td><td class="nowrap" data-field="expires">'
        f'{e(expiry_text(v.expires_at, now))}</td>'
        f'<td>{_status_cells(v)}</td></tr>'
        for v in sorted(views, key=lambda v: v.name))
    if not rows:
        rows = '<tr><td colspan="5" class="muted">No custom domains yet.</td></tr>'
    options = "".join(f'<option value="{e(a)}">{e(a)}</option>' for a in sorted(apps))
    content = (
        f'<h1>Domains</h1><p class="sub">Certificates and Let\'s Encrypt status of every '
        f'custom domain on this node. Statuses refresh by themselves.</p>{alerts(error, ok)}'
        f'<div class="card flush"><table id="domains"><thead><tr><th>Domain</th><th>App</th>'
        f'<th>Certificate in use</th><th>Expires</th><th>Let\'s Encrypt</th></tr></thead>'
        f'<tbody>{rows}</tbody></table></div>'
        f'<div class="card"><h2>Add a domain</h2>'
        f'<form method="post" action="/domains" class="inline">{csrf_field(csrf)}'
        f'<div><label for="name">Domain name</label><input type="text" id="name" name="name" '
        f'placeholder="www.example.com" required></div>'
        f'<div><label for="app">App</label><select id="app" name="app">{options}</select></div>'
        f'<div class="fit"><button type="submit" id="add">Add</button></div></form></div>')
    return layout("Domains", content, nonce=nonce, csrf=csrf, poll="/api/v1/domains")


def _cert_card(title: str, cert: CertView | None, serving: bool, now: float) -> str:
    badge = (' <span class="status s-in_use">serving</span>' if serving else "")
    if cert is None:
        return f'<div class="card"><h2>{e(title)}</h2><p class="muted">None.</p></div>'
    return (
        f'<div class="card" id="cert-{e(cert.source)}"><h2>{e(title)}{badge}</h2><dl>'
        f'<dt>Names</dt><dd>{e(", ".join(cert.names))}</dd>'
        f'<dt>Issuer</dt><dd>{e(cert.issuer)}</dd>'
        f'<dt>Valid from</dt><dd>{e(date(cert.not_before))}</dd>'
        f'<dt>Expires</dt><dd>{e(expiry_text(cert.not_after, now))}</dd>'
        f'<dt>SHA-256</dt><dd><code class="fingerprint">{e(cert.fingerprint)}</code></dd>'
        f'</dl></div>')


def domain_page(v: DomainView, *, nonce: str, csrf: str, now: float,
                error: str | None = None, ok: str | None = None) -> str:
    path = f"/domains/{e(v.name)}"
    remove_custom = ""
    if v.custom is not None:
        remove_custom = (f'<form method="post" action="{path}/certificate/delete" '
                         f'data-confirm="Remove the custom certificate of {e(v.name)}?">'
                         f'{csrf_field(csrf)}<button class="secondary" type="submit" '
                         f'id="remove-custom">Remove custom certificate</button></form>')
    custom_card = _cert_card("Custom certificate", v.custom, v.in_use == "custom", now)
    acme_card = _cert_card("Let's Encrypt certificate", v.acme, v.in_use == "letsencrypt", now)
    content = (
        f'<p class="sub"><a href="/domains">← Domains</a></p>'
        f'<div data-domain="{e(v.name)}"><h1>{e(v.name)}</h1>'
        f'<p class="sub">App <b>{e(v.app)}</b></p>'
        f'<div class="card"><dl><dt>Certificate in use</dt><dd id="in-use">{_source(v)}</dd>'
        f'<dt>Expires</dt><dd data-field="expires">{e(expiry_text(v.expires_at, now))}</dd>'
        f'<dt>Let\'s Encrypt</dt><dd>{_status_cells(v)}</dd></dl></div></div>'
        f'<div class="grid">'
        f'{custom_card}{acme_card}'
        f'</div>'
        f'<div class="card" id="upload"><h2>Custom certificate</h2>'
        f'<p class="sub">The chain file holds your certificate first, then the intermediate '
        f'certificates; the key is the unencrypted PEM private key.</p>{alerts(error, ok)}'
        f'<form method="post" action="{path}/certificate" enctype="multipart/form-data">'
        f'{csrf_field(csrf)}'
        f'<label for="certificate">Certificate chain (PEM)</label>'
        f'<input type="file" id="certificate" name="certificate" '
        f'accept=".pem,.crt,.cer,.txt,application/x-pem-file" required>'
        f'<label for="key">Private key (PEM)</label>'
        f'<input type="file" id="key" name="key" accept=".pem,.key,.txt" required>'
        f'<div class="actions"><button type="submit" id="validate">Validate</button></div>'
        f'</form></div>'
        f'<div class="card"><h2>Danger zone</h2><div class="actions">{remove_custom}'
        f'<form method="post" action="{path}/delete" '
        f'data-confirm="Remove {e(v.name)} and its certificates?">{csrf_field(csrf)}'
        f'<button class="danger" type="submit" id="remove-domain">Remove domain</button>'
        f'</form></div></div>')
    return layout(v.name, content, nonce=nonce, csrf=csrf, poll=f"/api/v1/domains/{v.name}")


def message_page(title: str, text: str, *, nonce: str, csrf: str | None = None) -> str:
    content = (f'<div class="card"><h1>{e(title)}</h1><p>{e(text)}</p>'
               f'<p><a href="/domains">Back to the domains</a></p></div>')
    return layout(title, content, nonce=nonce, csrf=csrf)
