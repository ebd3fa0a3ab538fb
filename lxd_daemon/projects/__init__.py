"""Projects: their config, limits and restrictions (policy.py)."""
