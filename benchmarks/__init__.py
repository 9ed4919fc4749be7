"""pylomin's benchmarks: one harness (`benchmarks.harness`) and one case per question (`python -m benchmarks.CASE`)."""
