"""The thinpool command line."""
