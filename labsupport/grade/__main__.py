"""``python -m labsupport.grade``: see :mod:`labsupport.grade.cli`."""

from labsupport.grade.cli import main

raise SystemExit(main())
