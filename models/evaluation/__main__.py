"""``python -m models.evaluation``: see :mod:`models.evaluation`."""

from models.evaluation import main

raise SystemExit(main())
