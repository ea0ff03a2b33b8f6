"""Container front end over the pool: the containerd-style Snapshotter and what is built on it.

* :mod:`~thinpool.containers.snapshotter` -- the containerd Snapshotter (prepare/view/commit/remove/
  stat/update/walk/usage) whose snapshots are thin volumes ``snap/<namespace>/<n>``;
* :mod:`~thinpool.containers.filters` -- containerd's ``walk`` filter strings;
* :mod:`~thinpool.containers.layers` -- Docker-style image layers, images and containers over a Snapshotter;
* :mod:`~thinpool.containers.demo` -- ``thinpool demo``: Docker's "About storage drivers" walkthrough;
* :mod:`~thinpool.containers.realfs` -- ``thinpool demo --real-fs``: the same walkthrough with ext4 on
  NBD-attached thin volumes (root only).

Here "snapshot" and "commit" are containerd's words (a Snapshotter snapshot, committing an active
snapshot); the pool's own ``Pool.snapshot`` (dm-thin's create_snap) and ``Pool.commit`` (a metadata
transaction) are the engine's.
"""
