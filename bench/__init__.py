"""Benchmarks of megaslim (each writes its table to docs/); a package so tests import them normally."""
