"""Storage pools. Minimal for now: `dir` pools holding instance root filesystems and image caches."""
