"""``python -m research_operator``."""

from research_operator.main import main

raise SystemExit(main())
