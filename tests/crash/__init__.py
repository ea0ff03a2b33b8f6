"""Fault suites (slow): SIGKILL, torn writes, metadata corruption, host-filesystem faults."""
