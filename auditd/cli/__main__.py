"""`python -m auditd.cli`: the same entry point as the `auditd` script."""

import sys

from auditd.cli.main import main

sys.exit(main())
