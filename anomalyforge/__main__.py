import sys

from anomalyforge.cli import main

sys.exit(main())
