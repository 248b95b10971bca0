"""regcache's tests, in two lanes (`scripts/test unit`, `scripts/test e2e`; both by default).

unit/     plain functions and mitmproxy's test flows: any user, no namespace, no network, seconds
e2e/      real registries, clients and `regcache up`, as root in private namespaces (its conftest)
support/  real parts, client daemons and fake servers, for e2e tests and for the benchmarks

A package, so that tests and `python -m scripts.bench_...` import `tests.support` by name.
"""
