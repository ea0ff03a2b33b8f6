"""What-if simulation: replay block I/O traces through a pool and report what the pool did.

``traces.py`` reads traces (fio iolog, blkparse, MSR/SNIA CSV, plain CSV) as chunks of numpy arrays;
the replay, scenario, sweep and report modules drive pools with them.  A front end: it uses the
engine's public interface only.
"""
