"""Side-by-side transport benchmarks: `make bench` (python -m benchmarks.run)."""
