"""Server-level concerns: the /1.0 document and the server configuration."""
