import sys

from mlx_flash.cli import main

sys.exit(main())
