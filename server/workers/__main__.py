import sys

from .processes import main

sys.exit(main())
