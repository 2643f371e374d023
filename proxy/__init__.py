"""tlsedge: a TLS-terminating SNI reverse proxy for a PaaS edge node."""
