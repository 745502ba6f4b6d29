import sys

from lensbench.cli import main

sys.exit(main())
