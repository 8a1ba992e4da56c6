import sys

from cacflow.cli import main

sys.exit(main())
