"""Ray's authentication token file, kept private: created 0600 by dcanets, a warning when it is not.

Ray 2.60 authenticates every connection to a cluster with a token; whoever has it can run code on
the cluster. For a local Ray it creates ``~/.ray/auth_token`` itself, with the process's umask:
world-readable (0644) on most systems. ``dcanets tune`` turns token authentication on for the local
Ray it starts (``dcanets.cli.tune.configure_ray_auth``) and so creates the file first, readable by
its owner only, in the format Ray's own ``ray get-auth-token --generate`` writes (64 hex digits,
256 random bits). A token file it finds readable by others is one warning line with the fix.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Optional


def token_path() -> Optional[Path]:
    """The file Ray reads the token from (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``);
    None when ``RAY_AUTH_TOKEN`` holds the token itself."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    given = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(given).expanduser() if given else Path.home() / ".ray" / "auth_token"


def create_private_token() -> Optional[Path]:
    """Create ``~/.ray/auth_token`` (mode 0600, its folder 0700 if new) when Ray would create it:
    no token anywhere and no ``RAY_AUTH_TOKEN_PATH``. Returns the file created, else None."""
    path = token_path()
    if path is None or "RAY_AUTH_TOKEN_PATH" in os.environ or path.exists():
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it just now
        return None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def exposure() -> Optional[str]:
    """A warning when the token file is readable or writable by others than its owner, else None."""
    path = token_path()
    try:
        mode = path.stat().st_mode if path is not None else 0
    except OSError:
        return None
    if not mode & (stat.S_IRWXG | stat.S_IRWXO):
        return None
    return (f"the Ray token file {path} is readable by other users (mode {stat.S_IMODE(mode):04o}): whoever reads "
            f"it can run code on your Ray cluster; chmod 600 {path}")


__all__ = ["create_private_token", "exposure", "token_path"]
