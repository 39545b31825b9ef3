"""beowulf: turn the computers you have into one cluster over plain SSH.

`fab --list` shows the tasks; `fab --help TASK` documents a task's flags.
"""

from tasks import ns  # noqa: F401  (fab looks for a collection named ns)
