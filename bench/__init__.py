"""Benchmarks: engine micro-benchmark over gRPC, HTTP serving load generator, Hugging Face
baseline, memory-bandwidth ceiling, the CPU benchmark of the embedded model, and plots.
Each module runs with `python -m bench.<module> --help`; see bench/README.md."""
