"""Sub-commands of the ``cacflow`` command line, one module each."""
