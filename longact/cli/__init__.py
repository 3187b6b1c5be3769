"""LongAct cli."""
