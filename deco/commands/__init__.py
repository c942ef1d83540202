"""Sub-commands of the ``deco`` command line (see :mod:`deco.cli`)."""
