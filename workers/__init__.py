"""Delivery side: per-channel Celery tasks, provider adapters, retry policy, the sweeper that
re-enqueues what the broker lost, and the delivery log."""
