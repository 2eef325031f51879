"""Benchmark harness behind the ``facekernels-bench`` console script."""
