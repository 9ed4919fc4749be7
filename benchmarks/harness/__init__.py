"""The benchmark harness: models, contenders, the child entry point, capped runs and reports, shared by every case."""
