"""Test suite of thinpool (a package so that test modules import shared helpers as tests.*)."""
