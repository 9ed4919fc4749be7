"""Moved to `benchmarks.harness.cgroup` (cgroup v1 and v2): this name stays until tests/test_adapt.py imports that."""

from benchmarks.harness.cgroup import CappedRun, run_capped, unavailable

__all__ = ["CappedRun", "run_capped", "unavailable"]
