"""python -m castbot.chatlog: export, review, delete and purge the conversation log (castbot/chatlog/cli.py)."""

import sys

from castbot.chatlog.cli import main

sys.exit(main())
