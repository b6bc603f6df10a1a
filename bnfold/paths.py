"""Output-path safety: which files a command reads, and refusing outputs that would replace them.

Every command that writes (``fuse``, ``insert``, ``recalibrate``, and the ``--report`` /
``--junit`` files of any command) must never replace a file its input reads: the model
file and each external-data file it refers to. A write goes through a rename, so the
danger is a *name* the input reads being replaced (``fuse m.onnx -o m.onnx.data``
destroys the weights of ``m.onnx``). Names are compared after resolving ``..`` and
symlinks, and files that exist are also compared by inode (hard links).

Batches add two rules (:func:`check_batch_targets`): no two models may be written to
the same file, and no model may be written over another model of the batch.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import BnfoldError, PathLike

# Folders a search for models never enters unless named explicitly: other people's
# packages and environments, not the user's models.
SKIPPED_FOLDER_NAMES = frozenset({"site-packages", "dist-packages", "node_modules", "__pycache__"})


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file: the same inode where both exist (symlinks
    followed, hard links included), else equal once ``..`` and symlinks are resolved."""
    return _identity(a) == _identity(b)


def model_files(path: PathLike, model=None) -> List[Path]:
    """The files a model reads: the model file and each external-data file it refers to.

    ``model`` is the already loaded ``ModelProto`` (external data not loaded), if any;
    otherwise the file is loaded (its weights are not read).
    """
    from .modelio import external_files, load_model

    p = Path(path)
    if model is None:
        model = load_model(p, load_external=False)
    return [p] + sorted(external_files(model, p.parent))


def files_read(paths: Iterable[PathLike]) -> List[Path]:
    """:func:`model_files` of each model, or just its path when it cannot be loaded (its
    problem is reported where it is used)."""
    out: List[Path] = []
    for p in paths:
        try:
            out.extend(model_files(p))
        except BnfoldError:
            out.append(Path(p))
    return out


def check_output(target: PathLike, reads: Iterable[PathLike], *, what: str = "output",
                 allowed: Iterable[PathLike] = ()) -> None:
    """Refuse (``BnfoldError``, exit 2) a ``target`` that is one of the files in ``reads``.

    ``allowed`` lists files that may be replaced on purpose (``--in-place``: the model itself).
    """
    refuse_special(target, what)
    allowed = list(allowed)
    for r in reads:
        if same_file(target, r) and not any(same_file(target, a) for a in allowed):
            raise BnfoldError(f"{what} path is {r}, a file the input reads; refusing to replace it", target)


def refuse_special(target: PathLike, what: str = "output") -> None:
    """Refuse (exit 2) a ``target`` that exists and is not a regular file or a folder (folders
    have their own message): a device (``-o /dev/null``), a FIFO, a socket, or a link to one
    (``/dev/stdout``). Outputs are written to a temporary file renamed into place, which
    would replace the device node itself."""
    if os.path.islink(target):
        chain: List[str] = []
        p = os.fspath(target)
        while os.path.islink(p) and len(chain) < 40:
            p = os.path.join(os.path.dirname(p), os.readlink(p))
            chain.append(p)
        if any(os.path.normpath(c).startswith(("/proc/", "/dev/fd/")) for c in chain):
            # /dev/stdout and friends: renaming onto the link would replace the system's link
            raise BnfoldError(f"{what} path is a link to an open file descriptor; bnfold writes a temporary "
                              "file and renames it into place, which would replace the link: give the path "
                              "of a regular file", target)
    kind = special_kind(target)
    if kind is not None:
        raise BnfoldError(f"{what} path is {kind}; bnfold writes a temporary file and renames it into place, "
                          "which would replace it: give the path of a regular file", target)


def special_kind(path: PathLike) -> Optional[str]:
    """What ``path`` is (followed through links) when it exists and is neither a regular file nor a
    folder: "a FIFO (named pipe)", "a socket", "a device"; None otherwise (also when it is not there)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def probe_writable(target: PathLike, what: str = "report") -> None:
    """Before any work: refuse (exit 2) a file that cannot be created where it is asked for,
    by creating and removing a temporary file beside it (``os.access`` says yes under /proc,
    and on read-only mounts for root)."""
    import tempfile

    p = Path(target)
    if not p.parent.is_dir():
        raise BnfoldError(f"{what} folder '{p.parent}' does not exist", p)
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".probe")
    except OSError as e:
        raise BnfoldError(f"{what} cannot be written there ({e.strerror or e})", p) from None
    os.close(fd)
    os.unlink(tmp)


def check_model_output(target: PathLike, reads: Sequence[PathLike], *, in_place: bool = False,
                       external_data: bool = True, hint: str = "") -> None:
    """Refuse a model output that would replace a file ``reads`` (model file first, then its
    external data) lists: the model file itself, and the ``<target>.data`` file it may write.

    With ``in_place`` the input model and its data files may be replaced (that is the point);
    the external data the output writes never takes the name of an input data file
    otherwise (:func:`bnfold.modelio.stage_model` picks another name). ``hint`` ends the
    message when the output is the model itself (e.g. ``"; use --in-place to overwrite it"``).
    """
    model = reads[0] if reads else None
    if in_place:
        return
    if model is not None and same_file(target, model):
        raise BnfoldError(f"output path is the input model{hint}", target)
    check_output(target, reads)
    if external_data and model is not None:
        data = Path(target).with_name(Path(target).name + ".data")
        refuse_special(data, "external data")
        if same_file(data, model):
            raise BnfoldError(f"its external data would be written to {data}, the input model; "
                              "choose another output name", target)


def default_output(model: PathLike, tag: str = "fused") -> Path:
    """``<stem>.<tag>.onnx`` beside ``model``."""
    p = Path(model)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(f"{stem}.{tag}.onnx")


def check_batch_targets(pairs: Sequence[Tuple[PathLike, Optional[PathLike]]], *, in_place: bool = False) -> None:
    """Refuse a batch, before anything is written, in which two models would be written to the
    same file, or a model would be written over another model of the batch.

    ``pairs`` are ``(model, target)``; a None target writes nothing.
    """
    seen: Dict[Path, PathLike] = {}
    for model, target in pairs:
        if target is None:
            continue
        key = _identity(target)
        if key in seen:
            raise BnfoldError(f"two models would be written here: {seen[key]} and {model} "
                              "(give them distinct names or use separate runs)", target)
        seen[key] = model
    for model, target in pairs:
        if target is None:
            continue
        for other, _ in pairs:
            if other is model or (in_place and same_file(other, model)):
                continue
            if same_file(target, other):
                raise BnfoldError(f"output for {model} would replace {other}, another input of this run", target)


def unique_models(paths: Iterable[Tuple[Path, Optional[Path]]]) -> List[Tuple[Path, Optional[Path]]]:
    """``(model, root)`` pairs with the same file named twice (``m.onnx ./m.onnx``) kept once."""
    out: List[Tuple[Path, Optional[Path]]] = []
    seen = set()
    for model, root in paths:
        key = _identity(model)
        if key not in seen:
            seen.add(key)
            out.append((model, root))
    return out


def _identity(p: PathLike):
    """A key equal for names of the same file: the inode where it exists, else the resolved name."""
    path = Path(p)
    try:
        st = path.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        try:
            return ("name", str(path.resolve()))
        except (RuntimeError, OSError):  # a symlink loop: RuntimeError before Python 3.13, OSError since
            raise BnfoldError("is a symbolic link loop", path) from None


def is_skipped_folder(folder: Path) -> bool:
    """Hidden folders, virtualenvs (``pyvenv.cfg``), site-packages, dist-packages, node_modules."""
    return (folder.name.startswith(".") or folder.name in SKIPPED_FOLDER_NAMES
            or (folder / "pyvenv.cfg").is_file())


def find_models(root: Path, exclude: Sequence[str] = (), outputs: bool = False) -> List[Path]:
    """The ``*.onnx`` files under ``root`` (sorted), skipping ``*.fused.onnx`` outputs (or only
    those, with ``outputs``), the folders :func:`is_skipped_folder` names and anything matching
    an ``exclude`` glob.

    A glob is matched against the path relative to ``root`` (``/``-separated) and against
    each of its parts, so ``--exclude 'legacy'`` and ``--exclude 'legacy/*.onnx'`` both work.
    """
    found: List[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        kept = []
        for d in sorted(dirs):
            sub = here / d
            if is_skipped_folder(sub) or _excluded(sub.relative_to(root), exclude):
                continue
            kept.append(d)
        dirs[:] = kept
        for f in sorted(files):
            if not f.endswith(".onnx") or f.endswith(".fused.onnx") != outputs:
                continue
            p = here / f
            if not _excluded(p.relative_to(root), exclude):
                found.append(p)
    return sorted(found)


def is_excluded(path: PathLike, globs: Sequence[str]) -> bool:
    """Whether a model named explicitly matches an ``--exclude`` glob: the path as given
    (``/``-separated), or any of its parts, as :func:`find_models` matches found files."""
    return _excluded(Path(path), globs)


def _excluded(rel: Path, globs: Sequence[str]) -> bool:
    text = rel.as_posix()
    return any(fnmatch.fnmatchcase(text, g) or any(fnmatch.fnmatchcase(part, g) for part in rel.parts)
               for g in globs)


def models_reading(data_file: Path) -> List[Path]:
    """The ``*.onnx`` models beside ``data_file`` whose external data lives in it (so a
    pre-commit run that is handed only a changed ``.onnx.data`` file checks its model).
    ``m.onnx.data`` belongs to ``m.onnx`` by name when that model exists; otherwise the
    models in its folder are read (weights not loaded) to find the ones that refer to it."""
    from .modelio import external_files, load_model

    if data_file.name.endswith(".onnx.data"):
        by_name = data_file.with_name(data_file.name[:-len(".data")])
        if by_name.is_file():
            return [by_name]
    target = data_file.resolve()
    found = []
    for candidate in sorted(data_file.parent.glob("*.onnx")):
        try:
            model = load_model(candidate, load_external=False)
        except BnfoldError:  # an unusable neighbour is not what was asked about
            continue
        if target in external_files(model, candidate.parent):
            found.append(candidate)
    return found
