"""Benchmarks of idsync on one machine: ingest, delivery at HubSpot's rate limit, batched vs naive.

Run ``python -m bench`` (``make bench``); ``python -m bench --help`` lists every size and
duration. Each benchmark starts the real processes through ``idsync.stack.Stack``, creates
and drops its own PostgreSQL database, uses its own Redis key prefix, and prints one
markdown table (also written to ``bench-results/latest.md``).
"""
