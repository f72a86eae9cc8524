"""Repository scripts (deployment checks)."""
