import sys

from research_cli.cli import main

sys.exit(main())
