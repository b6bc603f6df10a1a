"""The ``bnfold`` command's entry point (``python -m bnfold`` too).

Until the command installs its own handlers (``cli._take_signals``), Ctrl-C and SIGTERM end the
process as these signals do by default: nothing has started then, and Python's KeyboardInterrupt
there was a traceback from an import (or, inside a native module's initialisation, an abort). A
signal the shell set to be ignored (a background job) stays ignored.
"""
import signal


def run() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    from .cli import main

    main()


if __name__ == "__main__":
    run()
