"""Interoperability with the real dm-thin tools: thin_dump XML, binary metadata, thin_ls/delta/rmap/check formats.

Every producer and consumer here speaks one intermediate representation, :mod:`thinpool.interop.ir`.
"""
