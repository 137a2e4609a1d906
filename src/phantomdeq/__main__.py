import sys

from phantomdeq.cli import main

sys.exit(main())
