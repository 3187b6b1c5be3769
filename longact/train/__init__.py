"""LongAct train."""
