"""Runtime backends: the Python libraries that run pods, one package per kind (chosen per pod
by the CRI runtime handler)."""
