"""`make bench`: Clarion's throughput, latency and memory figures, each as a ratio against a
baseline measured in the same run with the same server settings and CPU pinning."""
