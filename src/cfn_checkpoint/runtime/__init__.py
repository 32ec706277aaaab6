"""The runtime tier: Redis capture/restore, the embedded server, cluster support."""
