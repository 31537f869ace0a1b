"""Placeholder replaced by the profiler (issue 7)."""
