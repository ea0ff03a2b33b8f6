"""The package's C extensions -- ``thinpool.cli._tablefmt`` (the CLI's table formatter) and
``thinpool._lscols`` (the name index and device-table columns ``ls`` reads): see docs/dependencies.md;
everything else is in pyproject.toml.  Both are optional: where they cannot be built (no C compiler or
no Python headers) the install goes on without them and the same work is done in Python."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("thinpool.cli._tablefmt", sources=["thinpool/cli/_tablefmt.c"], depends=["thinpool/_utf8.h"],
              optional=True),
    Extension("thinpool._lscols", sources=["thinpool/_lscols.c"], depends=["thinpool/_utf8.h"], optional=True),
])
