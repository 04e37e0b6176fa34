"""Durable daemon state: the embedded sqlite database and the typed stores built on it."""
