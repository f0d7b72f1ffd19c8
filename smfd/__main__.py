import sys

from smfd.cli import main

sys.exit(main())
