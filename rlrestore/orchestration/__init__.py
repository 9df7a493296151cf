"""The top layer: the commands and drivers that compose the core and the actor roles.

``cli`` (the ``rlrestore`` command), ``jobs`` (Ray session, Stage 1 Ray Train job), ``stage2``
(the Stage 2 driver), ``evaluation`` (``rlrestore eval``), ``analysis``, ``bench``, ``demo``,
``plotting``. Nothing below this package imports it (``tests/test_layers.py``).
"""
