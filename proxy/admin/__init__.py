"""Admin API and dashboard, on the admin listener only."""
