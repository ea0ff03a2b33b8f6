"""Data-file ownership, pool files (symlinks, modes, lock) and hostile inputs."""
