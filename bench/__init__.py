"""Benchmark of the appliance against tgt as a reference peer (see README.md)."""
