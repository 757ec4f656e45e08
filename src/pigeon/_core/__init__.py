"""The sans-IO core: every decision about deliveries, leases, retries,
request correlation, liveness and framing. Pure code: callers pass ``now``,
nothing here reads a clock, touches a socket or sleeps."""
