"""`python -m parity ...` (torchrun: `torchrun ... -m parity serve ...`): the `parity` command."""

from parity.cli import main

raise SystemExit(main())
