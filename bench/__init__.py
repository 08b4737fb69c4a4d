"""backhaul's benchmark: ``python -m bench`` (see bench/README.md).

It starts its own sshd nodes (``fixtures/sshd``) and backhauld processes,
builds its data under a cache dir, and compares backhaul with the OpenSSH
client in the same process (alternating A/B pairs, median ratio), because
absolute seconds on a shared machine are noise.
"""
