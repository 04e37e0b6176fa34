"""Stand-in guest agent, packed by guestbuild only while the repo has no real `vmagent/`.

It proves the guest boots into Python and reaches the host over the agent port; nothing more.
"""
