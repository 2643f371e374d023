// Confirmation of destructive forms, and the live refresh: poll the JSON API
// (same-origin, session cookie) every 3 s and write text only (textContent), never
// markup. The words match proxy/admin/pages.py (expiry_text, status_lines).
(function () {
  "use strict";
  document.querySelectorAll("form[data-confirm]").forEach(function (f) {
    f.addEventListener("submit", function (ev) {
      if (!window.confirm(f.getAttribute("data-confirm"))) ev.preventDefault();
    });
  });
  var url = document.body.getAttribute("data-poll");
  if (!url) return;
  var DAY = 86400;
  var labels = {custom: "Custom", letsencrypt: "Let's Encrypt", platform: "Platform"};
  var problems = JSON.parse(document.getElementById("problem-words").textContent);
  function date(ts) { return new Date(ts * 1000).toISOString().slice(0, 10); }
  function days(n) { return n + " day" + (n === 1 ? "" : "s"); }
  function expiry(ts) {
    if (ts === null) return "platform certificate";
    var left = ts - Date.now() / 1000;
    if (left < 0) {
      var ago = Math.floor(-left / DAY);
      return date(ts) + " \u00b7 expired " + (ago === 0 ? "less than a day" : days(ago)) +
        " ago";
    }
    var until = Math.floor(left / DAY);
    return date(ts) + " \u00b7 in " + (until === 0 ? "less than a day" : days(until));
  }
  function problemWords(error) {
    var found = [], re = /urn:ietf:params:acme:error:([A-Za-z]+)/g, m;
    while ((m = re.exec(error)) !== null) found.push(m[1]);
    if (!found.length) return null;
    var kind = found.filter(function (k) { return k !== "compound"; })[0] || found[0];
    return Object.prototype.hasOwnProperty.call(problems.known, kind)
      ? problems.known[kind] : problems.unknown;
  }
  function statusLines(d) {
    if (d.status !== "error") return [d.message, "", ""];
    var words = problemWords(d.last_error || "");
    var text = words || d.last_error || d.message;
    return [text, text === d.message ? "" : d.message, words ? d.last_error : ""];
  }
  function put(box, attr, field, text) {
    var el = box.querySelector("[" + attr + '="' + field + '"]');
    if (el && el.textContent !== text) el.textContent = text;
    return el;
  }
  function show(el, on) { if (el && el.hidden === on) el.hidden = !on; }
  function card(box, d, source, serving) {
    var el = box.querySelector('[data-cert="' + source + '"]');
    if (!el) return;
    var c = d[source];
    show(el.querySelector('[data-cert-field="none"]'), !c);
    show(el.querySelector('[data-cert-field="details"]'), !!c);
    show(el.querySelector('[data-cert-field="serving"]'), !!c && d.in_use === serving);
    if (!c) return;
    put(el, "data-cert-field", "names", c.names.join(", "));
    put(el, "data-cert-field", "issuer", c.issuer);
    put(el, "data-cert-field", "not_before", date(c.not_before));
    put(el, "data-cert-field", "expires", expiry(c.not_after));
    put(el, "data-cert-field", "fingerprint", c.fingerprint);
  }
  function apply(d, box) {
    var st = put(box, "data-field", "status", d.status_label);
    if (st && /^[a-z_]+$/.test(d.status)) st.className = "status s-" + d.status;
    var lines = statusLines(d);
    var msg = put(box, "data-field", "message", lines[0]);
    if (msg) msg.className = d.status === "error" ? "msg err" : "msg";
    put(box, "data-field", "detail", lines[1]);
    put(box, "data-field", "raw", lines[2]);
    show(box.querySelector('[data-field="raw-box"]'), lines[2] !== "");
    var src = put(box, "data-field", "in_use", labels[d.in_use] || d.in_use);
    if (src && /^[a-z]+$/.test(d.in_use)) src.className = "src src-" + d.in_use;
    put(box, "data-field", "expires", expiry(d.expires_at));
    card(box, d, "custom", "custom");
    card(box, d, "acme", "letsencrypt");
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
