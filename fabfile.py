"""beowulf: turn the computers you have into one cluster over plain SSH.

`fab --list` shows the tasks; `fab --help TASK` documents a task's flags.
"""

import sys

# Cache bytecode even where the environment says not to (PYTHONDONTWRITEBYTECODE): without the
# cache every fab command compiles the modules it imports again, a tenth of a second of start-up
# (BENCHMARKS.md, "fab map (issue 12)"). The commands fab runs keep the environment as it is.
sys.dont_write_bytecode = False

from tasks import ns  # noqa: E402, F401  (fab looks for a collection named ns)
