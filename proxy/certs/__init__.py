"""Certificates: validated bundles (bundle), SSLContext construction (tls) and the
immutable SNI table with its bounded context cache (table). Nothing in this package
talks to the store, writes a file, or logs key material.
"""
