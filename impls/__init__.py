"""Providers: implementations of the IR ops, each registered by importing its module."""
