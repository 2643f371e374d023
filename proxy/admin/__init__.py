"""Admin API and dashboard, on the admin listener only (`listen.admin`, in the supervisor).

server.py (listener, aiohttp) -> api.py (entry point, JSON API) and dashboard.py (pages,
forms) -> auth.py (token, sessions, CSRF, login limit), bodies.py (forms, uploads, JSON,
body limits), pages.py (jinja2 templates in templates/, autoescaped). Every change goes
through proxy.registry; nothing here imports the data plane.
"""
