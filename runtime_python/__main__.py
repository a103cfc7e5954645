import sys

from runtime_python.server import main

sys.exit(main())
