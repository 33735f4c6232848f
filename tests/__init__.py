"""unimodality's test suite (a regular package: a top-level ``tests`` package some dependencies install, e.g.
efaar-benchmarking's, must not shadow it)."""
