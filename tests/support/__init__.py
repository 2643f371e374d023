"""Reusable test infrastructure: a local DNS server, Pebble, an HTTP-01 responder, ports."""
