"""The data plane: listeners, TLS, HTTP relay. Reads immutable snapshots only."""
