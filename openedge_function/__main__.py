import sys

from openedge_function.cli import main

sys.exit(main())
