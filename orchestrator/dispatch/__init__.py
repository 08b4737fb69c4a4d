"""How a due or manual run reaches the code that executes it (``base.Runner``):
in-process (``--role all``, the thread pools of ``local.py``) or through a
PostgreSQL run queue that worker processes on any machine take runs from
(``procrastinate.py``)."""
