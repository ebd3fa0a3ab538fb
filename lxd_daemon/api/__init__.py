"""HTTP routers: one module per API resource. Parse, call a service, render the envelope."""
