"""Shipped to every host. Standard library only, Python 3.6 syntax."""
