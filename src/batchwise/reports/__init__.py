"""What people read: terminal tables, the HTML report, Prometheus metrics, result exports."""
