"""Test helpers, plain Python without pytest: the e2e tests and the benchmarks (scripts/) import
them as `tests.support.parts`, `.clients` and `.fakes`."""
