"""dcanets' built-in plugins.

Each module is a plugin declared under the ``dcanets`` entry-point group in dcanets'
``pyproject.toml``, the same way a third-party package declares its own; see
``plugins/examples/`` for such a package.
"""
