import sys

from ssql_core.cli import main

sys.exit(main())
