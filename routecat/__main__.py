import sys

from routecat.cli import main

sys.exit(main())
