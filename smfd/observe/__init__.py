"""Observability: Prometheus metrics, the HTTP endpoints, structured logs and systemd notification."""
