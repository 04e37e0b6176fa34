import sys

from criserver.cli import main

sys.exit(main())
