"""Routing math that several methods share (pure tensor code). A method's own routing lives with the
method, e.g. CRAM's groups and centroids in :mod:`cramcl.methods.cram`."""
