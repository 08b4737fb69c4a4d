"""How a due or manual run reaches the code that executes it: in-process
(``--role all``, the thread pools in ``server.py``) or through a PostgreSQL
run queue that worker processes on any machine take runs from."""
