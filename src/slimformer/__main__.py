import sys

from slimformer.cli import main

sys.exit(main())
