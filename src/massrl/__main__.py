import sys

from massrl.cli import main

sys.exit(main())
