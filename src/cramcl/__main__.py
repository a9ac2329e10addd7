import sys

from cramcl.cli import main

sys.exit(main())
