import sys

from mldash_syncd.cli import main

sys.exit(main())
