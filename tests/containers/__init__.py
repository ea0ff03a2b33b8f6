"""The containerd snapshotter, layers demo and real-filesystem runs."""
