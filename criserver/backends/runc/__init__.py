"""The runc backend: trusted pods' containers run with runc on the host, each watched by a
ctrmon."""
