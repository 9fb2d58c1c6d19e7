"""The admin API (127.0.0.1:15000), the metrics/readiness HTTP plumbing and the status CLI."""
