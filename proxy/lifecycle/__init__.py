"""The certificate lifecycle (the sidecar): DNS checks, ACME orders, renewals, statuses."""
