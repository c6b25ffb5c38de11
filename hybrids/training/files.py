"""Files a run reads and writes: can its folders be written, and which checkpoint does a rerun resume from.

`check_writable` runs before a run, sweep or report writes anything, so that a read-only runs/ ends in one
line naming the path instead of a traceback from deep inside Lightning, MLflow or SQLite.

A rerun resumes from last.ckpt if it is intact, else from the newest intact checkpoint beside it. A checkpoint
is a zip archive (torch.save's format); an empty, truncated or overwritten file fails the archive's CRC check
without unpickling anything. A broken file is never deleted: it is renamed to
<name>.broken (the run would otherwise overwrite last.ckpt at its next save) and the run says so.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

from blocks import ConfigError


def local_path(url: str) -> Path | None:
    """The file behind a sqlite:/// or journal: URL; None for a server URL."""
    for prefix in ("sqlite:///", "journal:"):
        if url.startswith(prefix) and url != "sqlite:///:memory:":
            return Path(url.removeprefix(prefix))
    return None


def check_writable(path: str | Path, what: str) -> None:
    """Raise unless `path` (a folder or file, existing or not) can be created or written.

    Args:
        path: the folder or file the caller is about to write.
        what: what it is, for the message ("run folder", "study storage", ...).
    Raises:
        ConfigError: one line naming the path and the folder that refuses it.
    """
    path = Path(path)
    nearest = path.absolute()
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    if nearest.exists() and not nearest.is_dir() and nearest != path.absolute():
        raise ConfigError(f"cannot write the {what} {path}: {nearest} is a file, not a folder")
    folder = nearest if nearest.is_dir() else nearest.parent
    if not os.access(folder, os.W_OK | os.X_OK) or (nearest.is_file() and not os.access(nearest, os.W_OK)):
        blocked = nearest if nearest.is_file() else folder
        raise ConfigError(f"cannot write the {what} {path}: {blocked} is read-only")


def broken_reason(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be loaded, or None if its archive is intact."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return f"not a readable checkpoint: {err}"
    return f"corrupt member {bad}" if bad else None


def _set_aside(path: Path) -> Path:
    target, n = path.with_name(path.name + ".broken"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.broken{n}")
    path.rename(target)
    return target


def resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint a rerun of the run in `ckpt_dir` resumes from; None for a fresh run.

    last.ckpt is tried first, then the other *.ckpt files newest first. Broken ones are renamed to
    <name>.broken, with one line on stderr naming the file and the fallback.

    Raises:
        ConfigError: when checkpoints exist and none is intact (naming every broken file).
    """
    last = ckpt_dir / "last.ckpt"
    others = sorted((p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt"),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    candidates = ([last] if last.is_file() else []) + others
    broken: list[tuple[Path, str]] = []
    for path in candidates:
        reason = broken_reason(path)
        if reason is None:
            for bad, why in broken:
                kept = _set_aside(bad)
                print(f"hybrids: checkpoint {bad} is broken ({why}); kept as {kept.name}, resuming from {path}",
                      file=sys.stderr, flush=True)
            return path
        broken.append((path, reason))
    if broken:
        names = "; ".join(f"{p} ({why})" for p, why in broken)
        raise ConfigError(f"cannot resume: no intact checkpoint in {ckpt_dir}: {names}; move them away to "
                          "start the run afresh")
    return None
