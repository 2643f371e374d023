"""Admin API and dashboard, on the admin listener only (`listen.admin`, in the supervisor).

server.py (listener) -> wire.py (HTTP/1.1, size limits) -> api.py (JSON API, entry point)
and dashboard.py (pages, forms) -> auth.py (token, sessions, CSRF, login limit), forms.py
(bodies), pages.py (escaped HTML). Every change goes through proxy.registry; nothing here
imports the data plane.
"""
