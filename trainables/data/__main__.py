"""python -m trainables.data DIR: check a dataset as a study would (see trainables.prepare.main)."""

import sys

from trainables.prepare import main

sys.exit(main())
