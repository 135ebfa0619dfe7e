"""Running compiled kernels: the ``Device`` protocol (``device.py``), the executor over a kernel plan
(``executor.py``), the weights bound once (``bind.py``), and host programs as data (``host_program.py``)."""
