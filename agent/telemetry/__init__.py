"""Telemetry: Prometheus metrics (Istio's TCP metrics and nodemesh's own) and access logs."""
