"""Thin routers: each parses the request, calls one function, shapes the answer."""
