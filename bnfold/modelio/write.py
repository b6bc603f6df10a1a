"""Writing atomically: a temporary file (or folder) beside the destination, then a rename.

An interrupted or failed write leaves any earlier output intact and no partial file. File
modes follow what the user already has: a file that is replaced keeps its mode (``--in-place``
included); a new model takes the input model's mode and its new external data the input's
data file's mode; files with no input to follow get the default (``0666`` less the umask).
"""
from __future__ import annotations

import contextlib
import functools
import operator
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Type

from onnx import ModelProto

from ..errors import BnfoldError, MalformedModelError, PathLike
from . import stream
from .external import write_external_data
from .pending import PendingValue
from .tensors import external_files, iter_tensors, tensor_nbytes, uses_external_data

# Above this size the output goes to external data even when the input had none.
EXTERNAL_THRESHOLD = 2**31 - 2**26


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode a new file gets when there is nothing to follow: ``0666`` less the umask."""
    return 0o666 & ~_umask()


def _mode_of(path: PathLike) -> Optional[int]:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None


def output_mode(path: PathLike, like: Optional[int] = None) -> int:
    """The mode for a file about to be written at ``path``: the mode of the file it replaces,
    else ``like`` (the input's), else :func:`default_mode`."""
    current = _mode_of(path)
    if current is not None:
        return current
    return like if like is not None else default_mode()


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (a replaced file keeps its mode)."""
    p = Path(path)
    _check_writable_folder(p)
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as e:  # a folder where nothing can be created (e.g. under /proc)
        raise BnfoldError(f"could not be written ({e.strerror or e}); an earlier file there is left as it was",
                          p) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, output_mode(p))
        os.replace(tmp, p)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise BnfoldError(f"could not be written ({e.strerror or e}); an earlier file there is left as it was",
                              p) from None
        raise


def _check_writable_folder(p: Path) -> None:
    folder = p.parent
    if not folder.is_dir():
        raise BnfoldError(f"output folder '{folder}' does not exist", p)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BnfoldError(f"output folder '{folder}' is not writable", p)
    if p.is_dir():
        raise BnfoldError("output path is a directory", p)


class StagedModel:
    """A model written to a private folder beside its destination, not yet visible.

    ``path`` can be loaded and verified as the final file would be (external data
    included); :meth:`commit` renames the files into place, :meth:`discard` (or
    leaving the ``with`` block uncommitted) removes them.
    """

    def __init__(self, target: Path, tmpdir: str, files: Tuple[str, ...],
                 modes: Optional[Mapping[str, int]] = None) -> None:
        self.target = target
        self.tmpdir = tmpdir
        self.files = files
        self.modes = dict(modes or {})
        """Mode of each new file (by name) when it replaces none; see :func:`output_mode`."""
        self.path = os.path.join(tmpdir, target.name)

    def commit(self) -> None:
        try:
            for name in self.files:  # data before the model that refers to it
                src = os.path.join(self.tmpdir, name)
                dest = self.target.parent / name
                os.chmod(src, output_mode(dest, self.modes.get(name)))
                os.replace(src, dest)
        except OSError as e:
            raise BnfoldError(f"could not be written ({e.strerror or e})", self.target) from None
        finally:
            self.discard()

    def discard(self) -> None:
        remove_folder(self.tmpdir)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.discard()


def interrupting_signals() -> List[int]:
    """The signals that interrupt this process with a Python handler now: Ctrl-C unless it is ignored
    (a background job), SIGTERM where a handler takes it (the ``bnfold`` command turns it into Ctrl-C;
    its default action, which ends the process, is left alone). Call from the main thread."""
    taken: List[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler in (None, signal.SIG_IGN) or (sig == signal.SIGTERM and handler == signal.SIG_DFL):
            continue
        taken.append(sig)
    return taken


@contextlib.contextmanager
def signals_held() -> Iterator[List[int]]:
    """Hold Ctrl-C (and SIGTERM where a Python handler takes it: the ``bnfold`` command turns it into
    Ctrl-C; its default action is left alone) while files are renamed into place or a staging
    folder is removed, so that neither is left half done. Yields a list of the signals that
    arrived meanwhile (empty if none): the caller acts on them after. Done by swapping the
    Python-level handlers (blocking a signal in one thread would not do: another thread may
    receive it, and Python runs the handler in the main thread all the same); only the main
    thread can; elsewhere, and for a signal that is ignored, nothing changes."""
    caught: List[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {}
    for sig in interrupting_signals():
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def deliver(caught: List[int], *, raising: bool = True) -> None:
    """Raise again the first signal :func:`signals_held` held, now that the handlers are back, so that
    the real one runs: Ctrl-C's raises KeyboardInterrupt; the command's SIGTERM handler also records
    that it was SIGTERM (exit 143), which the held signal alone would not tell. ``raising=False``:
    for a caller that reports the interruption itself, the handler's KeyboardInterrupt is dropped."""
    if not caught:
        return
    try:
        signal.raise_signal(caught[0])
    except KeyboardInterrupt:
        if raising:
            raise


def remove_folder(path: PathLike) -> None:
    """Remove a staging folder and everything in it with signals held (a second Ctrl-C during the
    clean-up of the first had left empty staging folders behind); one that arrived meanwhile is
    raised again right after."""
    with signals_held() as caught:
        shutil.rmtree(path, ignore_errors=True)
    deliver(caught)


def stage_model(model: ModelProto, path: PathLike, *, external_data: Optional[bool] = None,
                replacements: Optional[Mapping[str, PendingValue]] = None, base_dir: Optional[PathLike] = None,
                avoid: Iterable[PathLike] = (), source: Optional[PathLike] = None) -> StagedModel:
    """Write ``model`` for ``path`` into a temporary folder beside it (see :class:`StagedModel`).

    ``replacements`` gives new data for main-graph initializers by name (pending values);
    they are streamed to disk without entering the model. Tensors still in external data
    are read from ``base_dir``. With ``external_data`` (or when the weights pass protobuf's
    2 GB limit) the weights go to ``<name>.data`` beside the model, copied or computed
    piece by piece; that converts the tensors of ``model`` in place to refer to that file,
    named after the output and never one of the files in ``avoid`` (the input's data files).
    ``source`` is the input model file: new output files take its mode (the data file the
    mode its external data files share).
    """
    p = Path(path)
    _check_writable_folder(p)
    if uses_external_data(model):
        external_data = True  # its weights stay out of the protobuf, as they came
    elif external_data is None:
        external_data = sum(tensor_nbytes(t) or 0 for t in iter_tensors(model)) > EXTERNAL_THRESHOLD
    model_mode = _mode_of(source) if source is not None else None
    data_modes = [m for m in (_mode_of(f) for f in sorted(external_files(model, base_dir))) if m is not None]
    # several data files: the bits they all allow (a private one stays private)
    data_mode = functools.reduce(operator.and_, data_modes) if data_modes else model_mode
    try:
        tmpdir = tempfile.mkdtemp(dir=p.parent, prefix=f".{p.name}.")
    except OSError as e:  # the private folder beside the output cannot be made (e.g. under /proc)
        raise BnfoldError(f"could not be written ({e.strerror or e}); nothing was changed", p) from None
    modes: Dict[str, int] = {}
    try:
        if external_data:
            data_name = p.name + ".data"
            taken = {Path(a).resolve() for a in avoid}
            k = 0
            while (p.parent / data_name).resolve() in taken:
                k += 1
                data_name = f"{p.name}.{k}.data"
            with open(os.path.join(tmpdir, data_name), "wb") as data_file:
                write_external_data(model, data_file, data_name, replacements or {}, base_dir)
            with open(os.path.join(tmpdir, p.name), "wb") as f:
                stream.write_model(model, f)
            files: Tuple[str, ...] = (data_name, p.name)
            if data_mode is not None:
                modes[data_name] = data_mode
        else:
            # Atomic against interruption and write errors (temporary file, then rename); no
            # fsync: a power-loss barrier would cost ~10% of a fold and the input is never touched.
            with open(os.path.join(tmpdir, p.name), "wb") as f:
                stream.write_model(model, f, replacements, base_dir)
            files = (p.name,)
        if model_mode is not None:
            modes[p.name] = model_mode
    except BaseException as e:
        remove_folder(tmpdir)
        if isinstance(e, OSError):
            raise BnfoldError(f"could not be written ({e.strerror or e}); nothing was changed", p) from None
        if isinstance(e, MalformedModelError):  # the input's tensor data does not match its dims
            raise BnfoldError(f"could not be written ({e}); nothing was changed", p) from None
        raise
    return StagedModel(p, tmpdir, files, modes)


def save_model(model: ModelProto, path: PathLike, *, external_data: Optional[bool] = None) -> None:
    """Write ``model`` to ``path`` atomically (see :func:`stage_model`)."""
    stage_model(model, path, external_data=external_data).commit()
