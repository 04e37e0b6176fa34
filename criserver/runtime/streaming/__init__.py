"""Exec, attach and port-forward: the streaming server, its wire protocols (SPDY/3.1 and
WebSocket), and the interface backends implement to serve them."""
