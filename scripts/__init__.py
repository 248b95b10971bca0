"""The benchmarks are modules of this package, run from the checkout's root so that they import
`scripts.bench_setup` and `tests.support` by name: `sudo .venv/bin/python -m scripts.bench_cold`."""
