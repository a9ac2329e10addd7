"""The speed benchmarks (``python -m bench`` lists them; bench/__main__.py runs them)."""
