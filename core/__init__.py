"""What every Clarion app uses and none owns: Redis access, the token bucket, the database
clock, the caches, logs, metrics and the outbox wake signal. Imports no Clarion app
(tests/test_import_graph.py), so any layer may import it."""
