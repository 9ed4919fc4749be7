"""Tools around the library: the CLI, the profiler and memory measurement."""
