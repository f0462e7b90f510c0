import sys

from codsr.cli import main

sys.exit(main())
