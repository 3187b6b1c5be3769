"""The embedded demo and the reproduction experiment (tiny scale, CPU)."""
