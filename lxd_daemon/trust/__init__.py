"""Server identity and the trust store."""
