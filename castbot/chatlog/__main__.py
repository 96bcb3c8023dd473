"""python -m castbot.chatlog: export, purge and count the conversation log (castbot/chatlog/store.py)."""

import sys

from castbot.chatlog.store import main

sys.exit(main())
