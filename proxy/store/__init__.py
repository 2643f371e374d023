"""The store: the one source of truth for domains, certificates, challenges, statuses."""
