"""The CRI RuntimeService: pods, containers, events, and the backends that run them."""
