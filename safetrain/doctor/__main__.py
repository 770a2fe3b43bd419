"""`python -m safetrain.doctor`: the doctor's command line, or with `--child` the instrumented child process.

python -m safetrain.doctor --child record.json train.py --epochs 5   # what `doctor.run` starts
"""

import sys

from safetrain.doctor.instrument import child_main
from safetrain.doctor.report import main

if len(sys.argv) > 1 and sys.argv[1] == "--child":
    sys.exit(child_main(sys.argv[2:]))
sys.exit(main())
