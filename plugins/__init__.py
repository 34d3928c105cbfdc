"""dcanets' built-in plugins.

Each module is one plugin, registered in code by ``dcanets.plugins.DEFAULT_PLUGINS`` (not by an
entry point: those are for third-party packages, see ``plugins/examples/``) and holding one
model family, with one short builder function per registered name, as in timm.
"""
