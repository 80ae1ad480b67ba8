import sys

from onnxlr.cli import main

sys.exit(main())
