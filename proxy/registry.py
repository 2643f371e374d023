"""The domain rules in one place: used by the CLI, the admin API and the lifecycle."""
