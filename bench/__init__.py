"""Benchmarks of wbcache against real processes (``make bench`` runs ``bench.core``)."""
