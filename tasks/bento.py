"""`python -m tasks.bento` kept for scripts written before the move: the build is tasks/release/bento.py."""

import sys

from tasks.release.bento import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
