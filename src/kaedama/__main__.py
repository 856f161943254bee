import sys

from kaedama.cli import main

sys.exit(main())
