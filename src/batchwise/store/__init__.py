"""The SQL store: the only package that talks to the database.

Every table is written here and nowhere else; the rest of batchwise calls named functions
grouped by aggregate (requests, batches, ledger, events, jobs, leases, intake sinks).
"""
