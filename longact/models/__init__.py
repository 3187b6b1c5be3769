"""LongAct models."""
