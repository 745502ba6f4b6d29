import sys

from lensbench.commands import main

sys.exit(main())
