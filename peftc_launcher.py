"""The `peftc` console script: a Ctrl-C while peftc starts up prints one line and exits 130.

Importing peftc imports torch (seconds); an interrupt in there would otherwise print a long traceback. This module
imports nothing heavy, so its handler is in place before those imports start. Once peftc.cli is imported, Ctrl-C
raises KeyboardInterrupt again, so `finally` blocks clean up (staged ONNX files) and `main` exits 130.
"""

import os
import signal
import sys


def _exit_interrupted(signum, frame):
    os.write(2, b"peftc: interrupted\n")
    os._exit(130)


def main() -> int:
    signal.signal(signal.SIGINT, _exit_interrupted)
    from peftc.cli import main as cli_main

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = cli_main()
    finally:
        signal.signal(signal.SIGINT, _exit_interrupted)
    # Interpreter shutdown with torch loaded takes a while and restores the default SIGINT action (death by signal,
    # exit -2); everything peftc writes is closed by now, so leave at once.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe
        pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
