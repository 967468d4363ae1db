"""``llava-reid install-profile``: make ``snakemake --profile slurm`` work from any directory.

Snakemake resolves a profile given by name in the working directory, then in its user config
folder (``~/.config/snakemake`` on Linux), then in its system one (``/etc/xdg/snakemake``).
This links (or copies) the repository's ``profiles/slurm`` into the user folder under the
name ``slurm``, so the name resolves wherever the workflow is started. An existing profile of
that name is never replaced: the command says what is there and how to pick another name.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PROFILE = "slurm"
# The repository the package runs from (editable install or PYTHONPATH=src): src/llava_reid/.
REPO = Path(__file__).resolve().parents[2]


class ProfileInstallError(RuntimeError):
    """The profile was not installed; the message says why and what to do."""


@dataclass(frozen=True)
class Installed:
    target: Path
    source: Path
    action: str  # "linked", "copied", "already linked", "already copied"

    def message(self) -> str:
        how = {"linked": "Linked", "copied": "Copied", "already linked": "Already linked:",
               "already copied": "Already installed (identical copy):"}[self.action]
        arrow = "->" if "linked" in self.action else "from"
        return (f"{how} {self.target} {arrow} {self.source}. "
                f"`snakemake --profile {self.target.name}` now finds it from any directory.")


def snakemake_user_config_dir() -> Path:
    """The user folder Snakemake searches for profiles by name (the same call Snakemake makes)."""
    try:
        from snakemake.common import get_appdirs
    except ImportError:  # Snakemake not installed: its own dependency platformdirs may be
        try:
            from platformdirs import AppDirs
        except ImportError as err:
            raise ProfileInstallError(
                "snakemake is not installed here: pip install -e '.[workflow]' first") from err
        return Path(AppDirs("snakemake", "snakemake").user_config_dir)
    return Path(get_appdirs().user_config_dir)


def default_source() -> Path:
    """profiles/slurm of the repository this package runs from, else of the working directory."""
    for root in (REPO, Path.cwd()):
        candidate = root / "profiles" / PROFILE
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ProfileInstallError(
        f"no profiles/{PROFILE}/config.yaml beside the installed package ({REPO}) or in the "
        "working directory: run this from the repository root, or pass --source DIR")


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(
        _same_tree(a / d, b / d) for d in cmp.common_dirs)


def install_profile(source: Path | None = None, dest: Path | None = None, name: str = PROFILE,
                    copy: bool = False) -> Installed:
    """Install ``source`` (default: the repository's profiles/slurm) as ``dest/name`` (default:
    Snakemake's user config folder). Idempotent; refuses to replace anything else there."""
    source = (source or default_source()).resolve()
    if not (source / "config.yaml").is_file():
        raise ProfileInstallError(f"{source} is not a Snakemake profile (no config.yaml in it)")
    if not name or os.sep in name or name in (".", ".."):
        raise ProfileInstallError(f"--name {name!r} is not a folder name")
    dest = Path(dest) if dest is not None else snakemake_user_config_dir()
    target = dest / name
    if target.is_symlink() or target.exists():
        if target.is_symlink() and target.resolve() == source:
            return Installed(target, source, "already linked")
        if target.is_dir() and not target.is_symlink() and _same_tree(source, target):
            return Installed(target, source, "already copied")
        what = (f"a link to {os.readlink(target)}" if target.is_symlink()
                else "a folder" if target.is_dir() else "a file")
        raise ProfileInstallError(
            f"{target} already exists ({what}); left as it is. Install under another name "
            f"with --name NAME (then `snakemake --profile NAME`), or remove it and rerun")
    dest.mkdir(parents=True, exist_ok=True)
    if copy:
        # Copy to a temporary name and rename: never a half-copied profile under the real name.
        tmp = dest / f".{name}.tmp-{os.getpid()}"
        shutil.copytree(source, tmp)
        tmp.rename(target)
        return Installed(target, source, "copied")
    target.symlink_to(source, target_is_directory=True)
    return Installed(target, source, "linked")
