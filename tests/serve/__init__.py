"""NBD serving: protocol, pool backend, real NBD clients, hostile clients and control socket."""
