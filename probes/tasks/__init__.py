"""Tasks: the task-file reader (files.py) and each kind of task (relational, N-back), on a common base."""
