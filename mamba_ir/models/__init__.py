"""Hybrid models whose SSM layers call only the IR ops."""
