import sys

from owlrun.cli import main

sys.exit(main())
