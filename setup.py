"""The package's one C extension, ``thinpool.cli._tablefmt`` (the CLI's table formatter: see
docs/dependencies.md); everything else is in pyproject.toml.  The extension is optional: where it
cannot be built (no C compiler or no Python headers) the install goes on without it and the CLI
writes its tables in Python."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("thinpool.cli._tablefmt", sources=["thinpool/cli/_tablefmt.c"], optional=True)])
