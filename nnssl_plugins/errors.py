"""One exception type for user mistakes, and the CLI wrapper that turns it into one clear line.

Library code raises `UserInputError("<file/argument>: <what is wrong>. <how to fix>")`; every
`nnssl_*` command runs through `run_cli`, which prints `ERROR: <message>` to stderr and exits 2
without a traceback. Programming errors still raise normally (they are bugs, not user input).
"""
from __future__ import annotations

import sys
from typing import Callable


class UserInputError(Exception):
    """Bad input from the user (file, argument, environment). The message names it and the fix."""


def quiet_library_warnings() -> None:
    """Third-party deprecation chatter (torch.jit via timm/sam2 imports) is noise on our CLIs."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit.*")


def one_line(message: object) -> str:
    """The message on one line (third-party error texts, e.g. SimpleITK's, span several)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_cli(main: Callable[[], int | None]) -> None:
    quiet_library_warnings()
    try:
        rc = main()
    except UserInputError as e:
        print(f"ERROR: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(rc or 0))


def install_excepthook() -> None:
    """For stock entry points we do not wrap (`nnUNetv2_train -tr <our trainer>`): an uncaught
    UserInputError prints one `ERROR:` line instead of a traceback (exit status stays Python's 1).
    Other exceptions go to the previous hook unchanged. Idempotent."""
    prev = sys.excepthook
    if getattr(prev, "_nnssl", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, UserInputError):
            sys.stdout.flush()
            print(f"ERROR: {one_line(exc)}", file=sys.stderr, flush=True)
            return
        prev(exc_type, exc, tb)

    hook._nnssl = True
    sys.excepthook = hook
